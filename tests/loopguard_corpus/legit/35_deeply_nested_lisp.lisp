```lisp
(defun flatten (tree)
  (cond ((null tree) nil)
        ((atom tree) (list tree))
        (t (append (flatten (car tree))
                   (flatten (cdr tree))))))

(flatten '(1 (2 (3 (4 (5 (6 (7 (8)))))))))
;; => (1 2 3 4 5 6 7 8)
```
