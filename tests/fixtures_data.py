"""Builders of tiny copies of the public dataset layouts (real folder and file names, 64x64 images)."""
from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
from PIL import Image

SIDE = 64


def png_bytes(seed: int = 0, mode: str = "L", size: tuple[int, int] = (SIDE, SIDE),
              fmt: str = "PNG") -> bytes:
    """A small random image encoded as bytes."""
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(size[1], size[0]), dtype=np.uint8)
    im = Image.fromarray(arr).convert(mode)
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def calibrated_sample(n: int, seed: int, classes: int = 4,
                      spread: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    """Softmax of random logits, and labels drawn from those probabilities: calibrated by design
    (what conformal coverage and threshold tests need)."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, spread, (n, classes))
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    labels = (p.cumsum(axis=1) < rng.random(n)[:, None]).sum(axis=1).clip(0, classes - 1)
    return p, labels


def write_png(path: Path, seed: int = 0, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = "JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else "PNG"
    path.write_bytes(png_bytes(seed, fmt=fmt, **kwargs))
    return path


def build_muhammedtalo(root: Path) -> Path:
    """``X-Ray Image DataSet/{Covid-19,No_findings,Pneumonia}`` with 3 + 3 + 3 images and 2 bad files.

    Patients: 00000001 has two normal follow-ups; 00000002 has a pneumonia image. COVID-19 images
    have arbitrary names (patient unknown). Bad files: a zero-byte png and a text file.
    """
    base = root / "X-Ray Image DataSet"
    write_png(base / "Covid-19" / "1-s2.0-S0140673620303706-fx1_lrg.jpg", 1, mode="RGB")
    write_png(base / "Covid-19" / "covid-19-pneumonia-7-PA.png", 2, mode="RGBA")
    write_png(base / "Covid-19" / "01E392EE-69F9-4E33-BFCE-E5C968654078.jpeg", 3)
    write_png(base / "No_findings" / "00000001_000.png", 4)
    write_png(base / "No_findings" / "00000001_001.png", 5)
    write_png(base / "No_findings" / "00000003_000.png", 6)
    write_png(base / "Pneumonia" / "00000002_000.png", 7)
    write_png(base / "Pneumonia" / "00000004_002.png", 8)
    write_png(base / "Pneumonia" / "00000005_000.png", 9)
    (base / "Pneumonia" / "00000006_000.png").write_bytes(b"")
    (base / "No_findings" / "notes.txt").write_text("not an image")
    return root


RADIOGRAPHY = ("COVID", "Lung_Opacity", "Normal", "Viral Pneumonia")


def build_radiography(root: Path, per_class: int = 2) -> Path:
    """``COVID-19_Radiography_Dataset/{class}/images|masks`` plus ``<class>.metadata.xlsx``."""
    base = root / "COVID-19_Radiography_Dataset"
    for ci, cls in enumerate(RADIOGRAPHY):
        for i in range(1, per_class + 1):
            write_png(base / cls / "images" / f"{cls}-{i}.png", 10 * ci + i)
            write_png(base / cls / "masks" / f"{cls}-{i}.png", 100 + 10 * ci + i)
        (base / f"{cls}.metadata.xlsx").write_bytes(b"PK\x03\x04 not a real workbook")
    (base / "README.md.txt").write_text("COVID-19 Radiography Database")
    return root


IEEE8023_FIELDS = ["patientid", "offset", "sex", "age", "finding", "RT_PCR_positive", "survival",
                   "view", "modality", "date", "location", "folder", "filename", "doi", "url",
                   "license", "clinical_notes", "other_notes"]
VIETNAM = "auntminnie-a-2020_01_28_23_51_6665_2020_01_28_Vietnam_coronavirus.jpeg"
# (patientid, finding, view, modality, filename, write the file?)
IEEE8023_ROWS = [
    ("2", "Pneumonia/Viral/COVID-19", "PA", "X-ray", VIETNAM, True),
    ("2", "Pneumonia/Viral/COVID-19", "AP Supine", "X-ray", "auntminnie-b.jpeg", True),
    ("3", "Pneumonia/Viral/COVID-19", "L", "X-ray", "lateral.jpeg", True),
    ("4", "Pneumonia/Bacterial/Streptococcus", "AP", "X-ray", "strep.png", True),
    ("5", "Pneumonia/Viral/SARS", "AP semi erect", "X-ray", "sars.png", True),
    ("6", "No Finding", "PA", "X-ray", "normal.png", True),
    ("7", "Pneumonia/Fungal/Pneumocystis", "PA", "X-ray", "pcp.png", True),
    ("8", "Tuberculosis", "PA", "X-ray", "tb.png", True),
    ("9", "Pneumonia/Viral/COVID-19", "Axial", "CT", "ct.png", True),
    ("10", "Pneumonia/Viral/COVID-19", "PA", "X-ray", "missing.png", False),
    ("11", "Pneumonia", "AP erect", "X-ray", "plain.png", True),
]


def build_ieee8023(root: Path) -> Path:
    """``covid-chestxray-dataset-master/metadata.csv`` + ``images/``, one file missing."""
    base = root / "covid-chestxray-dataset-master"
    (base / "images").mkdir(parents=True)
    with (base / "metadata.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=IEEE8023_FIELDS)
        writer.writeheader()
        for i, (pid, finding, view, modality, name, exists) in enumerate(IEEE8023_ROWS):
            folder = "images" if modality == "X-ray" else "volumes"
            writer.writerow({"patientid": pid, "finding": finding, "view": view,
                             "modality": modality, "folder": folder, "filename": name})
            if exists:
                write_png(base / folder / name, 200 + i)
    return root


KAGGLE_FILES = {
    "train/NORMAL": ["IM-0115-0001.jpeg", "IM-0115-0002.jpeg", "NORMAL2-IM-1427-0001.jpeg"],
    "train/PNEUMONIA": ["person1_bacteria_1.jpeg", "person1_virus_6.jpeg", "person2_bacteria_3.jpeg"],
    "val/NORMAL": ["NORMAL2-IM-1430-0001.jpeg"],
    "val/PNEUMONIA": ["person1946_bacteria_4874.jpeg"],
    "test/NORMAL": ["IM-0001-0001.jpeg", "odd-name.jpeg"],
    "test/PNEUMONIA": ["person3_virus_15.jpeg", "person2_bacteria_4.jpeg"],
}


def build_kaggle(root: Path) -> Path:
    """``chest_xray/{train,val,test}/{NORMAL,PNEUMONIA}`` with Kaggle names, and a ``.DS_Store``."""
    base = root / "chest_xray"
    for i, (folder, names) in enumerate(KAGGLE_FILES.items()):
        for j, name in enumerate(names):
            write_png(base / folder / name, 300 + 10 * i + j)
    (base / "train" / "NORMAL" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    return root
