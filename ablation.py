"""Ablation studies of the MobileNetV4 CIFAR-10 recipes: how much accuracy each ingredient buys.

The entry point of the studies package (studies/): `python ablation.py --help` lists the studies and the flags."""

from studies.cli import main

if __name__ == "__main__":
    main()
