```javascript
export function debounce(fn, ms) {
  let timer = null;
  return function (...args) {
    if (timer !== null) {
      clearTimeout(timer);
    }
    timer = setTimeout(() => {
      timer = null;
      fn.apply(this, args);
    }, ms);
  };
}

export function throttle(fn, ms) {
  let last = 0;
  return function (...args) {
    const now = Date.now();
    if (now - last >= ms) {
      last = now;
      fn.apply(this, args);
    }
  };
}

const handlers = {
  onResize: debounce(() => console.log("resize"), 100),
  onScroll: throttle(() => console.log("scroll"), 50),
  onInput: debounce(() => console.log("input"), 300),
};

window.addEventListener("resize", handlers.onResize);
window.addEventListener("scroll", handlers.onScroll);
document.querySelector("input").addEventListener("input", handlers.onInput);
```
