To start every counter at zero, allocate the table up front:

```python
import numpy as np

# 20 sensors, 4 channels each: nothing counted yet
counts = np.array([
    [0, 0, 0, 0],
    [0, 0, 0, 0],
    [0, 0, 0, 0],
    [0, 0, 0, 0],
    [0, 0, 0, 0],
    [0, 0, 0, 0],
    [0, 0, 0, 0],
    [0, 0, 0, 0],
    [0, 0, 0, 0],
    [0, 0, 0, 0],
    [0, 0, 0, 0],
    [0, 0, 0, 0],
    [0, 0, 0, 0],
    [0, 0, 0, 0],
    [0, 0, 0, 0],
    [0, 0, 0, 0],
    [0, 0, 0, 0],
    [0, 0, 0, 0],
    [0, 0, 0, 0],
    [0, 0, 0, 0],
])

def record(sensor: int, channel: int) -> None:
    counts[sensor, channel] += 1
```

Each row is one sensor; `record(3, 1)` adds one to the fourth sensor's second channel.
