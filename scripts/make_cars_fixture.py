"""Writes tiny Stanford-Cars-style devkit .mat files into tests/fixtures/cars/.

They mirror the real devkit's structure (MATLAB v5, as scipy writes it): cars_meta.mat
holds a 1xC cell `class_names`; the annos files hold a 1xN struct array `annotations`
with uint8/uint16 scalar fields bbox_x1..bbox_y2 and class (1-based) and a char fname.
The meta and train files are zlib-compressed (miCOMPRESSED), as MATLAB writes the real
ones; the test file is not, so both reader paths are covered. The images are not
fixtures: tests/data.rs writes them itself. Run: python3 scripts/make_cars_fixture.py
"""
import os
import numpy as np
from scipy.io import savemat

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "cars")
CLASSES = ["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Audi TTS Coupe 2012"]
FIELDS = ["bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname"]


def annotations(rows):
    a = np.zeros((1, len(rows)), dtype=[(f, "O") for f in FIELDS])
    for i, (fname, cls) in enumerate(rows):
        box = [1 + i, 2, 30 + i, 20]
        for f, v in zip(FIELDS[:4], box):
            a[0, i][f] = np.array([[v]], dtype=np.uint16 if v > 255 else np.uint8)
        a[0, i]["class"] = np.array([[cls]], dtype=np.uint8)
        a[0, i]["fname"] = fname
    return a


def main():
    os.makedirs(os.path.join(OUT, "devkit"), exist_ok=True)
    names = np.empty((1, len(CLASSES)), dtype=object)
    names[0, :] = CLASSES
    savemat(os.path.join(OUT, "devkit", "cars_meta.mat"), {"class_names": names}, do_compression=True)
    train = [("%05d.jpg" % (i + 1), 1 + i % 3) for i in range(6)]
    test = [("%05d.jpg" % (i + 1), 1 + (i + 1) % 3) for i in range(4)]
    savemat(os.path.join(OUT, "devkit", "cars_train_annos.mat"), {"annotations": annotations(train)}, do_compression=True)
    # The labelled test annotations ship separately from the devkit, at the root.
    savemat(os.path.join(OUT, "cars_test_annos_withlabels.mat"), {"annotations": annotations(test)})


if __name__ == "__main__":
    main()
