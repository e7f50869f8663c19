```make
.PHONY: all test lint fmt clean

all: lint test

test:
	pytest -q

lint:
	ruff check .
	mypy src

fmt:
	ruff format .

clean:
	rm -rf build dist .pytest_cache
	find . -name __pycache__ -type d -exec rm -rf {} +
```
