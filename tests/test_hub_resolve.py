"""hf_io.resolve for hub ids (the hub itself faked: no network here): which files a download asks for."""

from __future__ import annotations

import fnmatch
import shutil
from pathlib import Path

import pytest

huggingface_hub = pytest.importorskip("huggingface_hub")

from jaxsft import hf_io  # noqa: E402


def fake_hub(repo: Path, cache: Path, asked: list):
    def snapshot_download(repo_id, allow_patterns=None, **_):
        asked.append(list(allow_patterns or []))
        cache.mkdir(parents=True, exist_ok=True)
        for f in repo.iterdir():
            if allow_patterns is None or any(fnmatch.fnmatch(f.name, p) for p in allow_patterns):
                shutil.copy(f, cache / f.name)
        return str(cache)

    return snapshot_download


def make_repo(folder: Path, *names: str) -> Path:
    folder.mkdir()
    for name in ("config.json", "tokenizer.json", *names):
        (folder / name).write_text("{}")
    return folder


def test_a_safetensors_repository_downloads_no_torch_weights(tmp_path, monkeypatch):
    repo = make_repo(tmp_path / "repo", "model.safetensors", "pytorch_model.bin", "tf_model.h5")
    asked: list = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_hub(repo, tmp_path / "cache", asked))
    local = hf_io.resolve("org/model")
    assert sorted(p.name for p in local.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert len(asked) == 1


def test_a_repository_with_only_torch_weights_downloads_them(tmp_path, monkeypatch):
    """e.g. microsoft/deberta-v3-base: pytorch_model.bin only; read with torch when it is installed."""
    repo = make_repo(tmp_path / "repo", "pytorch_model.bin", "tf_model.h5", "spm.model")
    asked: list = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_hub(repo, tmp_path / "cache", asked))
    local = hf_io.resolve("org/model")
    assert sorted(p.name for p in local.iterdir()) == ["config.json", "pytorch_model.bin", "spm.model",
                                                       "tokenizer.json"]
    assert asked[1] == ["pytorch_model.bin*"]
