"""The ``crisp-ext`` command (placeholder until the pipeline lands)."""

import argparse


def main(argv=None):
    parser = argparse.ArgumentParser(prog="crisp-ext", description="CRISP particle picker")
    parser.parse_args(argv)
    return 0
