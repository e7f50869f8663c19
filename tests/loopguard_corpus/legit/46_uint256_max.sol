Here is how to check for the largest uint256 value in Solidity:

```solidity
// SPDX-License-Identifier: MIT
pragma solidity ^0.8.20;

contract Limits {
    // 2**256 - 1: every bit set
    uint256 constant MAX = 0xffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff;

    function isMax(uint256 value) external pure returns (bool) {
        return value == MAX && value == type(uint256).max;
    }
}
```

`0xffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff` is the same number as `type(uint256).max`; the constant just spells it out in hex.
