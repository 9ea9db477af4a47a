r"""Copies the development datasets into the package, gzip'd and reproducible.

  python tools/bundle_data.py --source=<folder with the vendored datasets>

Every JSON/JSONL/text file becomes `<name>.gz` (gzip level 9, no name, mtime
0, so the same input gives the same bytes); PROVENANCE, README and licence
texts are copied as they are. `keditjax/data/MANIFEST.json` records each
file's sha256 *before* compression, which `tests/test_data.py` checks against
the decompressed bundle. The source folder is only read. This tool is for
maintainers refreshing the bundle; nothing at run time reads the source.
"""

import argparse
import gzip
import hashlib
import json
import os
import shutil

DEST = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                    "keditjax", "data")
COMPRESS = (".json", ".jsonl", ".tokens", ".raw")
COPY = (".txt", ".md")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--source", required=True)
  args = parser.parse_args()
  manifest = {}
  for root, _, files in os.walk(args.source):
    for name in sorted(files):
      src = os.path.join(root, name)
      rel = os.path.relpath(src, args.source)
      if rel == "README.md":  # the package has its own README
        continue
      dst = os.path.join(DEST, rel)
      os.makedirs(os.path.dirname(dst), exist_ok=True)
      if name.endswith(COMPRESS):
        raw = open(src, "rb").read()
        with open(dst + ".gz", "wb") as f:
          with gzip.GzipFile(filename="", mode="wb", fileobj=f, mtime=0,
                             compresslevel=9) as gz:
            gz.write(raw)
        manifest[rel + ".gz"] = {"sha256": hashlib.sha256(raw).hexdigest(),
                                 "bytes": len(raw)}
      elif name.endswith(COPY):
        shutil.copyfile(src, dst)
      else:
        raise SystemExit(f"do not know how to bundle {rel}")
  with open(os.path.join(DEST, "MANIFEST.json"), "w") as f:
    json.dump(dict(sorted(manifest.items())), f, indent=1)
    f.write("\n")
  print(f"{len(manifest)} files -> {DEST}")


if __name__ == "__main__":
  main()
