```sql
CREATE TABLE orders (
    id          BIGSERIAL PRIMARY KEY,
    customer_id BIGINT NOT NULL REFERENCES customers(id),
    status      TEXT NOT NULL DEFAULT 'new',
    total_cents BIGINT NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);

INSERT INTO orders (customer_id, status, total_cents) VALUES
    (1, 'new', 1999),
    (1, 'paid', 4999),
    (2, 'new', 999),
    (2, 'paid', 999),
    (3, 'shipped', 12999),
    (3, 'paid', 2599),
    (4, 'new', 1999),
    (4, 'cancelled', 0);

SELECT c.name, count(*) AS orders, sum(o.total_cents) / 100.0 AS total
FROM orders o
JOIN customers c ON c.id = o.customer_id
WHERE o.status <> 'cancelled'
GROUP BY c.name
ORDER BY total DESC;
```
