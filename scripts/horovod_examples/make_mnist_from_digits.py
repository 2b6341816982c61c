#!/usr/bin/env python
"""Write an MNIST-format stand-in built from scikit-learn's digits dataset.

Usage:  python make_mnist_from_digits.py DATA_DIR

Produces (uncompressed idx files, which is what torchvision's MNIST looks for):
    DATA_DIR/MNIST/raw/train-images-idx3-ubyte   (1437 x 28 x 28, uint8)
    DATA_DIR/MNIST/raw/train-labels-idx1-ubyte   (1437,        uint8)
    DATA_DIR/MNIST/raw/t10k-images-idx3-ubyte    (360 x 28 x 28,  uint8)
    DATA_DIR/MNIST/raw/t10k-labels-idx1-ubyte    (360,         uint8)

torchvision.datasets.MNIST(DATA_DIR, ...) then finds the files and never tries
to download (its _check_exists only tests that the four un-gzipped raw files
exist; no checksum is verified).

Each 8x8 digit (values 0..16) is upsampled bilinearly to 20x20, scaled to
0..255 and centred in a 28x28 zero canvas (like MNIST's 20x20 box in 28x28).
Split: train_test_split(test_size=0.2, random_state=0, stratify=y) -> 1437/360.
"""
import os
import struct
import sys

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split


def bilinear_resize(img, out_h, out_w):
    """Bilinear resize of a 2-D float array (half-pixel centres, edge clamped;
    same convention as torch interpolate(mode='bilinear', align_corners=False))."""
    in_h, in_w = img.shape

    def coords(n_out, n_in):
        x = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
        x = np.clip(x, 0, n_in - 1)
        x0 = np.floor(x).astype(int)
        x1 = np.minimum(x0 + 1, n_in - 1)
        return x0, x1, x - x0

    y0, y1, wy = coords(out_h, in_h)
    x0, x1, wx = coords(out_w, in_w)
    top = img[y0][:, x0] * (1 - wx) + img[y0][:, x1] * wx
    bot = img[y1][:, x0] * (1 - wx) + img[y1][:, x1] * wx
    return top * (1 - wy)[:, None] + bot * wy[:, None]


def to_mnist_images(images8):
    out = np.zeros((len(images8), 28, 28), dtype=np.uint8)
    for i, im in enumerate(images8):
        big = bilinear_resize(im.astype(np.float64), 20, 20) * (255.0 / 16.0)
        out[i, 4:24, 4:24] = np.clip(np.rint(big), 0, 255).astype(np.uint8)
    return out


def write_idx_images(path, images):
    n, h, w = images.shape
    with open(path, 'wb') as f:
        f.write(struct.pack('>iiii', 0x00000803, n, h, w))  # magic: uint8, 3 dims
        f.write(np.ascontiguousarray(images, dtype=np.uint8).tobytes())


def write_idx_labels(path, labels):
    with open(path, 'wb') as f:
        f.write(struct.pack('>ii', 0x00000801, len(labels)))  # magic: uint8, 1 dim
        f.write(np.asarray(labels, dtype=np.uint8).tobytes())


def main(argv):
    if len(argv) != 2:
        sys.exit('usage: %s DATA_DIR' % argv[0])
    raw = os.path.join(argv[1], 'MNIST', 'raw')
    os.makedirs(raw, exist_ok=True)

    digits = load_digits()
    X, y = digits.images, digits.target
    X_tr, X_te, y_tr, y_te = train_test_split(
        X, y, test_size=0.2, random_state=0, stratify=y)

    write_idx_images(os.path.join(raw, 'train-images-idx3-ubyte'), to_mnist_images(X_tr))
    write_idx_labels(os.path.join(raw, 'train-labels-idx1-ubyte'), y_tr)
    write_idx_images(os.path.join(raw, 't10k-images-idx3-ubyte'), to_mnist_images(X_te))
    write_idx_labels(os.path.join(raw, 't10k-labels-idx1-ubyte'), y_te)
    print('wrote %d train / %d test images to %s' % (len(y_tr), len(y_te), raw))


if __name__ == '__main__':
    main(sys.argv)
