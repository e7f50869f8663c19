```c
#include <stdio.h>
#include <stdlib.h>

typedef struct {
    int *data;
    size_t len;
    size_t cap;
} vec;

static int vec_push(vec *v, int x) {
    if (v->len == v->cap) {
        size_t cap = v->cap ? v->cap * 2 : 8;
        int *p = realloc(v->data, cap * sizeof *p);
        if (!p) {
            return -1;
        }
        v->data = p;
        v->cap = cap;
    }
    v->data[v->len++] = x;
    return 0;
}

int main(void) {
    vec v = {0};
    for (int i = 0; i < 100; i++) {
        if (vec_push(&v, i * i) != 0) {
            fprintf(stderr, "out of memory\n");
            return 1;
        }
    }
    for (size_t i = 0; i < v.len; i++) {
        if (i % 10 == 0) {
            printf("\n");
        }
        printf("%6d", v.data[i]);
    }
    printf("\n");
    free(v.data);
    return 0;
}
```
