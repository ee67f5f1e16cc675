"""Synthetic ADGEN-style data set for offline first runs and tests.

train.json (400 records), dev.json (40) and test.json (40) are JSON lines with the keys ``content``
(attributes such as ``类型#卫衣*材质#棉*颜色#灰色``) and ``summary`` (a one- to three-sentence Chinese
description built from those attributes). tools/make_sample_data.py in the repository generates them;
rerun it instead of editing the files by hand.
"""

from pathlib import Path


def sample_data_dir() -> Path:
    """Return the folder that contains train.json, dev.json and test.json."""
    return Path(__file__).resolve().parent
