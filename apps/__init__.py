"""visiondet's applications: the CLI, the training engine, predict and the demo."""

from pathlib import Path

# The shipped checkpoints and example images: ``weights/`` beside the packages, as the repository has it.
WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
