"""Write an offline stand-in of every `qpert data fetch` source into FOLDER (qpert.synthetic.mirror).

python scripts/make_data_mirror.py /tmp/mirror
qpert data fetch flickr30k --mirror /tmp/mirror --catalog /tmp/mirror/qpert-catalog.json --data-root /tmp/data
"""

from __future__ import annotations

import argparse
from pathlib import Path

from qpert.synthetic.mirror import write_mirror


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder", type=Path, help="Where the stand-ins go (created if missing).")
    parser.add_argument("--flickr-test", type=int, default=8, help="Flickr30K test images.")
    parser.add_argument("--flickr-val", type=int, default=6, help="Flickr30K val images.")
    parser.add_argument("--coco-test", type=int, default=8, help="COCO test images.")
    parser.add_argument("--coco-val", type=int, default=6, help="COCO val images.")
    parser.add_argument("--extra", type=int, default=3, help="Images per archive that no annotation names.")
    parser.add_argument("--seed", type=int, default=2000, help="Scene stream of Flickr30K (COCO: seed + 1).")
    args = parser.parse_args()
    catalog = write_mirror(
        args.folder,
        flickr_test=args.flickr_test,
        flickr_val=args.flickr_val,
        coco_test=args.coco_test,
        coco_val=args.coco_val,
        extra=args.extra,
        seed=args.seed,
    )
    print(f"wrote the stand-ins into {args.folder}; fetch them with:")
    print(f"  qpert data fetch all --mirror {args.folder} --catalog {catalog} --data-root DATA")


if __name__ == "__main__":
    main()
