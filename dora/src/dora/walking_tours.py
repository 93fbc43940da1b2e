"""``dora-walking-tours``: the Walking Tours (WTours) videos and how to obtain and anonymise them.

Lists the videos and prints the download and face-blurring steps; it downloads nothing. The YouTube links are in
``WTour.txt`` on the dataset card (huggingface.co/datasets/shawshankvkt/Walking_Tours); a mirror of the videos is
on figshare (uvaauas.figshare.com/articles/dataset/Dora_WalkingTours_Dataset_ICLR_2024_/25189275).
"""

from __future__ import annotations

import argparse
from pathlib import Path

# name, file stem used by configs/wt_all.yaml
VIDEOS = [
    ("Amsterdam", "Amsterdam"),
    ("Bangkok", "Bangkok"),
    ("Chiang Mai", "ChiangMai"),
    ("Istanbul", "Istanbul"),
    ("Kuala Lumpur", "KualaLumpur"),
    ("Singapore", "Singapore"),
    ("Stockholm", "Stockholm"),
    ("Venice", "Venice"),
    ("Zurich", "Zurich"),
    ("Wildlife safari", "Wildlife"),
]

HF_CARD = "https://huggingface.co/datasets/shawshankvkt/Walking_Tours"
FIGSHARE = "https://uvaauas.figshare.com/articles/dataset/Dora_WalkingTours_Dataset_ICLR_2024_/25189275"

INSTRUCTIONS = f"""
Walking Tours: 10 first-person city/wildlife walks, 4K (3840x2160) at 60 fps, CC-BY, 59 min to 2 h 55 min each.

1. Download
   - YouTube links: WTour.txt on {HF_CARD}
     (the card's download_WTours.py fetches the highest-resolution mp4 with pytube), or
   - the mirror on figshare: {FIGSHARE}
   Put the files at {{root}}/<name>.mp4 (names above), the layout configs/wt_venice.yaml and wt_all.yaml expect.

2. Blur faces and licence plates (GDPR), as the authors do, with deface (https://github.com/ORB-HD/deface):
     pip install deface
     for f in {{root}}/*.mp4; do deface "$f" -o "${{f%.mp4}}_blurred.mp4"; done
   then point data.videos at the *_blurred.mp4 files.

3. Optional, once per video: pre-extract frames at training resolution to a compact JPEG cache
   (data.cache_dir=PATH in dora-train builds it on first use) so that training no longer decodes 4K.

4. Train:  dora-train --config wt_venice data.videos=[{{root}}/Venice.mp4]
"""


def main(argv: list[str] | None = None) -> None:
    """Print the video list (marking files already present under ``--root``) and the preparation steps."""
    parser = argparse.ArgumentParser(prog="dora-walking-tours", description=__doc__)
    parser.add_argument("--root", default="data/WTours", help="folder that holds (or will hold) the videos")
    args = parser.parse_args(argv)
    root = Path(args.root)
    print(f"{'video':<18} {'expected file':<34} present")
    for name, stem in VIDEOS:
        path = root / f"{stem}.mp4"
        print(f"{name:<18} {str(path):<34} {'yes' if path.is_file() else 'no'}")
    print(INSTRUCTIONS.replace("{root}", str(root)))


if __name__ == "__main__":
    main()
