```bash
#!/usr/bin/env bash
set -euo pipefail

usage() {
  echo "usage: $0 <src> <dst>" >&2
  exit 2
}

[[ $# -eq 2 ]] || usage
src=$1
dst=$2

if [[ ! -d $src ]]; then
  echo "no such directory: $src" >&2
  exit 1
fi

mkdir -p "$dst"
for f in "$src"/*.jpg; do
  [[ -e $f ]] || continue
  name=$(basename "$f" .jpg)
  if [[ -e $dst/$name.webp ]]; then
    continue
  fi
  cwebp -q 80 "$f" -o "$dst/$name.webp"
done
echo "done"
```
