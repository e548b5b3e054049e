"""The three callbacks from a LightningCLI YAML config, on the bundled digits.

Run: ``python examples/05_lightning_cli.py fit --config examples/05_lightning_cli.yaml``. Every callback argument
can be set in the YAML (``trainer.callbacks``) or overridden on the command line.
"""

from lightning.pytorch.cli import LightningCLI

from lightning_beta.demos.digits import DigitsClassifier, DigitsDataModule


def main() -> None:
    LightningCLI(DigitsClassifier, DigitsDataModule, save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    main()
