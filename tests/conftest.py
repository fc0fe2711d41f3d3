import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """(model_dir, tokenizer_dir): tiny checkpoints in the real formats, built once per session."""
    import tiny_checkpoints

    return tiny_checkpoints.build_tiny_checkpoints(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tiny_engine(tiny_ckpt):
    """The engine on CPU fp32, loaded through the same loader as the CLI."""
    import inference

    return inference.load_engine(*tiny_ckpt, device="cpu", dtype="float32")
