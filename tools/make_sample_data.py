"""Generate the synthetic ADGEN-style sample data set shipped in src/ptuning_pl/sample_data.

Each record pairs an attribute string such as ``类型#卫衣*材质#棉*颜色#灰色*风格#休闲`` with a short
Chinese product description. The description is a fixed function of the attributes: every attribute
value maps to one phrase, and the phrases fill fixed sentence slots, so that a small model can learn the
mapping within a few hundred steps. The vocabularies and phrases are written for this project.

NOTE: that step count is the design goal. No training run on this data had been measured when it was written.

The output is deterministic for a given seed. Regenerate the shipped files with
``python tools/make_sample_data.py``, or check that they are current with ``--check``.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

DEFAULT_OUTPUT_DIR = Path(__file__).resolve().parents[1] / "src" / "ptuning_pl" / "sample_data"
DEFAULT_SEED = 2024
SPLIT_SIZES = {"train": 400, "dev": 40, "test": 40}
MAX_CONTENT_CHARS = 50
MAX_SUMMARY_CHARS = 60

# Garment type and the measure word that goes with it ("这件卫衣", "这条半身裙").
GARMENTS = {
    "上衣": "件",
    "衬衫": "件",
    "卫衣": "件",
    "毛衣": "件",
    "外套": "件",
    "马甲": "件",
    "连衣裙": "条",
    "半身裙": "条",
    "阔腿裤": "条",
    "短裤": "条",
}
COLOURS = ["白色", "黑色", "红色", "蓝色", "灰色", "米色", "绿色", "粉色", "黄色", "驼色"]
# Material and the phrase that describes how it feels.
MATERIALS = {
    "棉": "柔软透气",
    "牛仔布": "厚实耐磨",
    "针织": "弹性舒适",
    "雪纺": "轻盈垂坠",
    "羊毛": "保暖亲肤",
    "亚麻": "清爽吸汗",
    "丝绸": "光泽顺滑",
    "灯芯绒": "纹理细腻有质感",
}
PATTERNS = {
    "条纹": "条纹增添层次",
    "格子": "格纹经典耐看",
    "印花": "印花活泼吸睛",
    "刺绣": "刺绣点缀精致",
    "波点": "波点俏皮灵动",
    "纯色": "纯色干净利落",
}
FITS = {
    "宽松": "宽松版型不挑身材",
    "修身": "修身剪裁贴合曲线",
    "直筒": "直筒版型线条利落",
    "短款": "短款设计提升腰线",
}
STYLES = {
    "简约": "干净耐看",
    "复古": "带着怀旧味道",
    "休闲": "周末出行很合适",
    "通勤": "上班穿着得体",
    "甜美": "显得温柔减龄",
    "街头": "潮流感十足",
    "文艺": "安静又有书卷气",
}
# Probability that a record lists each optional attribute. The garment type is always listed.
ATTRIBUTE_PROBABILITY = {"材质": 0.85, "颜色": 0.85, "风格": 0.8, "图案": 0.6, "版型": 0.6}
# Order of the attributes in the content string, the same in every record.
ATTRIBUTE_ORDER = ["类型", "材质", "颜色", "风格", "图案", "版型"]
ATTRIBUTE_VALUES = {
    "材质": list(MATERIALS),
    "颜色": COLOURS,
    "风格": list(STYLES),
    "图案": list(PATTERNS),
    "版型": list(FITS),
}


def sample_attributes(rng: random.Random) -> dict[str, str]:
    """Draw a garment type and a random subset of the optional attributes."""
    attributes = {"类型": rng.choice(list(GARMENTS))}
    for key, probability in ATTRIBUTE_PROBABILITY.items():
        if rng.random() < probability:
            attributes[key] = rng.choice(ATTRIBUTE_VALUES[key])
    return attributes


def format_content(attributes: dict[str, str]) -> str:
    return "*".join(f"{key}#{attributes[key]}" for key in ATTRIBUTE_ORDER if key in attributes)


def write_summary(attributes: dict[str, str]) -> str:
    """Describe the garment in one to three sentences built only from its attributes."""
    garment = attributes["类型"]
    subject = f"这{GARMENTS[garment]}{attributes.get('颜色', '')}{garment}"

    material = attributes.get("材质")
    if material:
        sentences = [f"{subject}采用{material}面料，{MATERIALS[material]}。"]
    else:
        sentences = [f"{subject}是日常百搭的单品。"]

    details = []
    if "图案" in attributes:
        details.append(PATTERNS[attributes["图案"]])
    if "版型" in attributes:
        details.append(FITS[attributes["版型"]])
    if details:
        sentences.append("，".join(details) + "。")

    style = attributes.get("风格")
    if style:
        sentences.append(f"整体风格{style}，{STYLES[style]}。")
    return "".join(sentences)


def make_splits(seed: int = DEFAULT_SEED) -> dict[str, list[dict[str, str]]]:
    """Generate records with distinct content strings and cut them into the train, dev and test splits."""
    rng = random.Random(seed)
    total = sum(SPLIT_SIZES.values())
    seen: set[str] = set()
    records = []
    while len(records) < total:
        attributes = sample_attributes(rng)
        content = format_content(attributes)
        if content in seen:
            continue
        seen.add(content)
        records.append({"content": content, "summary": write_summary(attributes)})

    for record in records:
        if len(record["content"]) > MAX_CONTENT_CHARS or len(record["summary"]) > MAX_SUMMARY_CHARS:
            raise ValueError(f"record exceeds the length limits, so shorten the phrases: {record}")

    splits = {}
    start = 0
    for split_name, size in SPLIT_SIZES.items():
        splits[split_name] = records[start : start + size]
        start += size
    return splits


def render_json_lines(records: list[dict[str, str]]) -> str:
    return "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--output-dir",
        type=Path,
        default=DEFAULT_OUTPUT_DIR,
        help="folder to write train.json, dev.json and test.json to (default: the package's sample_data)",
    )
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="random seed (default: %(default)s)")
    parser.add_argument(
        "--check",
        action="store_true",
        help="compare instead of writing, and exit with status 1 if a file in the output folder differs",
    )
    args = parser.parse_args(argv)

    stale = []
    for split_name, records in make_splits(args.seed).items():
        path = args.output_dir / f"{split_name}.json"
        text = render_json_lines(records)
        if args.check:
            if not path.is_file() or path.read_text(encoding="utf-8") != text:
                stale.append(path)
            continue
        path.write_text(text, encoding="utf-8", newline="\n")
        print(f"wrote {len(records)} records to {path}")

    if stale:
        print(
            "these files differ from the generated data, so rerun without --check: "
            + ", ".join(str(path) for path in stale),
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
