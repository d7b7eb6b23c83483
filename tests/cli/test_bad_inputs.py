"""Bad inputs and faults, one table: every command that reads or writes fails with one line that names
the file, line, key or endpoint at fault, exit 2, no traceback, and leaves every file that existed
before byte-for-byte unchanged (the working folder and the shared checkpoint are hashed before and after).

Cases run in-process through `vembed.cli.main` in a fresh working folder each. Disk full (ENOSPC) and a
read-only file system (EROFS) are simulated by making one write raise the real OSError, since neither
can be produced for real here without root-only mounts.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from tests.conftest import free_port, write_pairs
from tests.support.synthetic_images import write_image_caption_set
from vembed.cli import main


@dataclass
class Ctx:
    work: Path  # the working folder (cwd) of the case
    ckpt: Path  # a complete adapter checkpoint (shared, read-only for the cases)
    run: Path  # the training run that holds it
    model: str  # the tiny base model
    data: Path  # a good training file in `work`


@dataclass
class Case:
    id: str
    argv: Callable[[Ctx], list[str]]
    expect: Callable[[Ctx], list[str]]  # substrings the error must contain
    setup: Callable[[Ctx], None] | None = None
    patch: Callable[[pytest.MonkeyPatch, Ctx], None] | None = None
    env: dict[str, str] = field(default_factory=dict)
    code: int = 2
    after: Callable[[Ctx], None] | None = None  # extra checks (nothing created, no temp left)


# --- helpers ---------------------------------------------------------------------------------


def tree_hashes(*roots: Path) -> dict[str, str]:
    out = {}
    for root in roots:
        for p in sorted(root.rglob("*")):
            if p.is_file() and not p.is_symlink():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def no_temp_left(root: Path) -> None:
    left = [str(p) for p in root.rglob("*") if ".tmp" in p.name or ".old-" in p.name]
    assert not left, f"temporary files left behind: {left}"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def config(ctx: Ctx, name: str = "cfg.yaml", **overrides) -> Path:
    values = {
        "model_name": ctx.model,
        "data_path": str(ctx.data),
        "output_dir": str(ctx.work / "out"),
        "batch_size": 8,
        "max_steps": 2,
        "save_steps": 1,
        "logging_steps": 1,
        "max_seq_length": 16,
        **overrides,
    }
    return write(ctx.work / name, "\n".join(f"{k}: {json.dumps(v)}" for k, v in values.items()) + "\n")


def copy_ckpt(ctx: Ctx, name: str = "ck") -> Path:
    dest = ctx.work / name
    shutil.copytree(ctx.ckpt, dest)
    return dest


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def fail_write(target: str, err: int, attr: str | None = None) -> Callable[[pytest.MonkeyPatch, Ctx], None]:
    """Make `module.func` (a writer) write part of its output and then raise the real OSError `err`."""
    module, func = target.rsplit(".", 1)

    def apply(mp: pytest.MonkeyPatch, ctx: Ctx) -> None:
        import importlib

        mod = importlib.import_module(module)

        def broken(*args, **kwargs):
            where = next((Path(a) for a in args if isinstance(a, (str, Path)) and os.sep in str(a)), None)
            if where is not None and where.is_dir():
                (where / "partial.bin").write_bytes(b"x" * 1024)
                where = where / "partial.bin"
            raise OSError(err, os.strerror(err), str(where) if where else None)

        mp.setattr(mod, func, broken)

    return apply


def pickle_only_copy(model: str, dest: Path) -> None:
    """The tiny model with its weights in pytorch_model.bin (torch.save's pickle) instead of safetensors."""
    import torch
    from safetensors.torch import load_file

    shutil.copytree(model, dest)
    torch.save(load_file(dest / "model.safetensors"), dest / "pytorch_model.bin")
    (dest / "model.safetensors").unlink()


def st_copy(model: str, dest: Path, pooling_config: str) -> None:
    """The tiny model as a sentence-transformers directory whose Pooling config is `pooling_config`."""
    shutil.copytree(model, dest)
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    write(dest / "modules.json", json.dumps(modules))
    write(dest / "1_Pooling" / "config.json", pooling_config)


def dead_url(auth: str = "") -> str:
    return f"http://{auth}127.0.0.1:{free_port()}"  # a free port: nothing listens there


def assert_not_created(rel: str) -> Callable[[Ctx], None]:
    def check(ctx: Ctx) -> None:
        assert not (ctx.work / rel).exists(), f"{rel} was created"

    return check


def assert_unchanged(rel: str, text: str) -> Callable[[Ctx], None]:
    def check(ctx: Ctx) -> None:
        assert (ctx.work / rel).read_text() == text, f"{rel} was changed"

    return check


# --- the table -------------------------------------------------------------------------------

NOSPC, ROFS = os.strerror(errno.ENOSPC), os.strerror(errno.EROFS)

CASES = [
    # config
    Case("config-missing", lambda c: ["config", "show", "nope.yaml"], lambda c: ["nope.yaml", "not found"]),
    Case("config-empty", lambda c: ["train", "empty.yaml"], lambda c: ["empty.yaml", "empty"],
         setup=lambda c: write(c.work / "empty.yaml", ""), after=assert_not_created("output")),
    Case("config-yaml-syntax", lambda c: ["config", "show", "bad.yaml"], lambda c: ["bad.yaml:2", "invalid YAML"],
         setup=lambda c: write(c.work / "bad.yaml", "lora_r: 8\n\tepochs: 1\n")),
    Case("config-unknown-key", lambda c: ["config", "show", "k.yaml"], lambda c: ["lora_rr", "lora_r"],
         setup=lambda c: write(c.work / "k.yaml", "lora_rr: 8\n")),
    Case("config-bad-value", lambda c: ["config", "show", "v.yaml"], lambda c: ["batch_size"],
         setup=lambda c: write(c.work / "v.yaml", "batch_size: many\n")),
    Case("config-is-directory", lambda c: ["config", "show", "cfgdir"], lambda c: ["cfgdir", "directory"],
         setup=lambda c: (c.work / "cfgdir").mkdir()),
    Case("config-not-a-mapping", lambda c: ["config", "show", "l.yaml"], lambda c: ["l.yaml", "mapping"],
         setup=lambda c: write(c.work / "l.yaml", "- a\n- b\n")),
    Case("config-non-string-key", lambda c: ["config", "show", "nk.yaml"], lambda c: ["nk.yaml", "key 1", "not a name"],
         setup=lambda c: write(c.work / "nk.yaml", "lora_r: 8\n1: 2\n")),
    Case("override-no-equals", lambda c: ["config", "show", str(config(c)), "--config_override", "lora_r"],
         lambda c: ["lora_r"]),
    Case("override-unknown-key", lambda c: ["config", "show", str(config(c)), "--config_override", "lorar=4"],
         lambda c: ["lorar"]),
    Case("output-dir-is-file", lambda c: ["train", str(config(c, output_dir=str(c.work / "taken")))],
         lambda c: ["output_dir", "taken", "not a directory"], setup=lambda c: write(c.work / "taken", "mine\n")),
    Case("output-dir-holds-user-config", lambda c: ["train", str(config(c, output_dir=str(c.work)))],
         lambda c: [str(c.work / "config.yaml"), "not written by a vembed run"],
         setup=lambda c: write(c.work / "config.yaml", "# my notes\nlora_r: 8\n")),
    Case("output-dir-holds-user-log", lambda c: ["train", str(config(c, output_dir=str(c.work / "run")))],
         lambda c: ["training_log.txt", "not written by a vembed run"],
         setup=lambda c: write(c.work / "run" / "training_log.txt", "my own log\n")),
    Case("resume-path-missing", lambda c: ["train", str(config(c, resume_from_checkpoint=str(c.work / "gone")))],
         lambda c: ["resume_from_checkpoint", "gone"]),
    Case("model-name-missing-path", lambda c: ["train", str(config(c, model_name="./no/such/model"))],
         lambda c: ["model_name", "./no/such/model", "does not exist"], after=assert_not_created("out")),
    Case("model-name-pickle-only", lambda c: ["train", str(config(c, model_name=str(c.work / "pk")))],
         lambda c: [str(c.work / "pk"), "pytorch_model.bin", "safetensors only"],
         setup=lambda c: pickle_only_copy(c.model, c.work / "pk"), after=assert_not_created("out")),
    Case("model-st-pooling-unsupported", lambda c: ["train", str(config(c, model_name=str(c.work / "st")))],
         lambda c: [str(c.work / "st"), "unsupported sentence-transformers pooling 'weighted'"],
         setup=lambda c: st_copy(c.model, c.work / "st", '{"pooling_mode": "weighted"}'), after=assert_not_created("out")),
    Case("model-st-config-cut-off", lambda c: ["train", str(config(c, model_name=str(c.work / "st")))],
         lambda c: [str(c.work / "st" / "1_Pooling" / "config.json"), "invalid JSON"],
         setup=lambda c: st_copy(c.model, c.work / "st", '{"pooling_mode": '), after=assert_not_created("out")),
    Case("model-weights-cut-off", lambda c: ["train", str(config(c, model_name=str(c.work / "mc")))],
         lambda c: [str(c.work / "mc" / "model.safetensors"), "truncated"],
         setup=lambda c: truncate(Path(shutil.copytree(c.model, c.work / "mc")) / "model.safetensors"),
         after=assert_not_created("out")),
    Case("model-tokenizer-cut-off", lambda c: ["train", str(config(c, model_name=str(c.work / "mc")))],
         lambda c: ["model_name", str(c.work / "mc"), "cannot load"],
         setup=lambda c: truncate(Path(shutil.copytree(c.model, c.work / "mc")) / "tokenizer.json"),
         after=assert_not_created("out")),
    Case("fp16-on-cpu", lambda c: ["train", str(config(c, torch_dtype="float16"))], lambda c: ["torch_dtype"]),
    # data
    Case("data-missing", lambda c: ["train", str(config(c, data_path=str(c.work / "nope.jsonl")))],
         lambda c: ["nope.jsonl", "not found"]),
    Case("data-invalid-json", lambda c: ["train", str(config(c, data_path=str(c.work / "b.jsonl")))],
         lambda c: ["b.jsonl:2", "invalid JSON"],
         setup=lambda c: write(c.work / "b.jsonl", '{"query": "a", "positive": "b"}\n{not json\n'),
         after=assert_not_created("out")),
    Case("data-missing-field", lambda c: ["train", str(config(c, data_path=str(c.work / "f.jsonl")))],
         lambda c: ["f.jsonl:1", "positive"], setup=lambda c: write(c.work / "f.jsonl", '{"query": "a"}\n')),
    Case("data-path-uri", lambda c: ["train", str(config(c, data_path="s3://bucket/train.jsonl"))],
         lambda c: ["s3://bucket/train.jsonl", "only local JSONL files"], after=assert_not_created("out")),
    Case("data-images-for-text-model", lambda c: ["train", str(config(c, data_path=str(c.work / "img" / "train.jsonl")))],
         lambda c: ["is a text model", "cannot embed image", "images/"],
         setup=lambda c: write_image_caption_set(c.work / "img", per_caption=1)),
    Case("data-empty-file", lambda c: ["train", str(config(c, data_path=str(c.work / "e.jsonl")))],
         lambda c: ["e.jsonl"], setup=lambda c: write(c.work / "e.jsonl", "")),
    Case("prepare-raw-missing", lambda c: ["prepare", "raw-nope.jsonl", "ds"], lambda c: ["raw-nope.jsonl"],
         after=assert_not_created("ds")),
    Case("prepare-bad-line", lambda c: ["prepare", "r.jsonl", "ds"], lambda c: ["r.jsonl:3"],
         setup=lambda c: write(c.work / "r.jsonl", '{"query": "a", "positive": "b"}\n\n[1]\n'),
         after=assert_not_created("ds")),
    Case("prepare-output-not-empty", lambda c: ["prepare", str(c.data), "full"], lambda c: ["full", "not empty"],
         setup=lambda c: write(c.work / "full" / "notes.txt", "keep me\n")),
    Case("prepare-output-is-file", lambda c: ["prepare", str(c.data), "afile"], lambda c: ["afile", "not a directory"],
         setup=lambda c: write(c.work / "afile", "keep me\n")),
    Case("prepare-eval-fraction", lambda c: ["prepare", str(c.data), "ds", "--eval-fraction", "1.5"],
         lambda c: ["eval_fraction"], after=assert_not_created("ds")),
    Case("prepare-disk-full", lambda c: ["prepare", str(c.data), "ds"], lambda c: ["ds", NOSPC],
         patch=fail_write("vembed.pipeline.steps.prepare.split_to_files", errno.ENOSPC), after=assert_not_created("ds")),
    # images
    Case("image-escapes-data-root", lambda c: ["prepare", "i.jsonl", "ds"], lambda c: ["i.jsonl:1", "../../etc/passwd"],
         setup=lambda c: write(c.work / "i.jsonl", '{"query": "a", "positive": "b", "positive_image": "../../etc/passwd"}\n')),
    Case("image-missing", lambda c: ["prepare", "m.jsonl", "ds"], lambda c: ["m.jsonl:1", "nope.png"],
         setup=lambda c: write(c.work / "m.jsonl", '{"query": "a", "positive": "b", "positive_image": "nope.png"}\n')),
    # checkpoints and encode
    Case("encode-missing-relative", lambda c: ["encode", "./no-model", "--text", "a"], lambda c: ["./no-model", "does not exist"]),
    Case("encode-missing-absolute", lambda c: ["encode", str(c.work / "gone" / "ckpt"), "--text", "a"],
         lambda c: [str(c.work / "gone" / "ckpt"), "does not exist"]),
    Case("encode-model-is-file", lambda c: ["encode", "f.txt", "--text", "a"], lambda c: ["f.txt", "is a file"],
         setup=lambda c: write(c.work / "f.txt", "x")),
    Case("encode-corrupt-with-manifest", lambda c: ["encode", "ck", "--text", "a"],
         lambda c: ["ck", "adapter_model.safetensors", "does not match manifest"]),
    Case("encode-truncated-no-manifest", lambda c: ["encode", "foreign", "--text", "a"],
         lambda c: ["adapter_model.safetensors", "truncated"]),
    Case("encode-checkpoint-without-manifest", lambda c: ["encode", "ck", "--text", "a"],
         lambda c: ["ck", "manifest.json"]),
    Case("encode-pickle-refused", lambda c: ["encode", "ck", "--text", "a"], lambda c: ["ck", "pickle"]),
    Case("encode-output-missing-folder", lambda c: ["encode", str(c.ckpt), "--text", "a", "--output", "no/dir/e.npy"],
         lambda c: ["no/dir/e.npy", "does not exist"]),
    Case("encode-output-is-dir", lambda c: ["encode", str(c.ckpt), "--text", "a", "--output", "od"],
         lambda c: ["od", "directory"], setup=lambda c: (c.work / "od").mkdir()),
    Case("encode-output-exists", lambda c: ["encode", str(c.ckpt), "--text", "a", "--output", "e.npy"],
         lambda c: ["e.npy", "exists", "--overwrite"], setup=lambda c: write(c.work / "e.npy", "mine\n"),
         after=assert_unchanged("e.npy", "mine\n")),
    Case("encode-output-exists-without-suffix", lambda c: ["encode", str(c.ckpt), "--text", "a", "--output", "e"],
         lambda c: ["e.npy", "exists"], setup=lambda c: write(c.work / "e.npy", "mine\n"),
         after=assert_unchanged("e.npy", "mine\n")),
    Case("encode-nothing-to-encode", lambda c: ["encode", str(c.ckpt)], lambda c: ["--text"]),
    Case("encode-dim-too-large", lambda c: ["encode", str(c.ckpt), "--text", "a", "--dim", "4096"], lambda c: ["dim=4096"]),
    # merge
    Case("merge-into-non-empty", lambda c: ["merge", str(c.ckpt), "mine"], lambda c: ["mine", "not empty"],
         setup=lambda c: write(c.work / "mine" / "thesis.txt", "years of work\n")),
    Case("merge-into-cwd", lambda c: ["merge", str(c.ckpt), "."], lambda c: ["current directory"],
         setup=lambda c: write(c.work / "notes.txt", "keep\n")),
    Case("merge-into-parent-of-cwd", lambda c: ["merge", str(c.ckpt), ".."], lambda c: ["current directory"]),
    Case("merge-into-own-run", lambda c: ["merge", "run/checkpoint-2", "run"], lambda c: ["run", "source checkpoint"],
         setup=lambda c: shutil.copytree(c.run, c.work / "run")),
    Case("merge-into-itself", lambda c: ["merge", "ck", "ck"], lambda c: ["ck", "source checkpoint"],
         setup=lambda c: copy_ckpt(c)),
    Case("merge-into-own-run-overwrite", lambda c: ["merge", "run/checkpoint-2", "run", "--overwrite"],
         lambda c: ["run", "source checkpoint"], setup=lambda c: shutil.copytree(c.run, c.work / "run")),
    Case("merge-into-source-subdir", lambda c: ["merge", "ck", "ck/merged"], lambda c: ["ck/merged", "inside"],
         setup=lambda c: copy_ckpt(c)),
    Case("merge-overwrite-not-a-merge", lambda c: ["merge", str(c.ckpt), "mine", "--overwrite"],
         lambda c: ["mine", "not an earlier merge output"], setup=lambda c: write(c.work / "mine" / "a.txt", "x\n")),
    Case("merge-overwrite-other-checkpoint", lambda c: ["merge", str(c.ckpt), "other", "--overwrite"],
         lambda c: ["other", "checkpoint"], setup=lambda c: copy_ckpt(c, "other")),
    Case("merge-output-is-file", lambda c: ["merge", str(c.ckpt), "afile"], lambda c: ["afile", "not a directory"],
         setup=lambda c: write(c.work / "afile", "keep\n")),
    Case("merge-source-missing", lambda c: ["merge", "no-ckpt", "m"], lambda c: ["no-ckpt", "does not exist"],
         after=assert_not_created("m")),
    Case("merge-source-not-checkpoint", lambda c: ["merge", "plain", "m"], lambda c: ["plain", "adapter_config.json"],
         setup=lambda c: write(c.work / "plain" / "x.txt", "x"), after=assert_not_created("m")),
    Case("merge-disk-full", lambda c: ["merge", str(c.ckpt), "m"], lambda c: ["m", NOSPC],
         patch=fail_write("vembed.inference.export.write_manifest", errno.ENOSPC), after=assert_not_created("m")),
    Case("merge-read-only", lambda c: ["merge", str(c.ckpt), "m"], lambda c: ["m", ROFS],
         patch=fail_write("vembed.inference.export.write_manifest", errno.EROFS), after=assert_not_created("m")),
    # evaluate
    Case("evaluate-data-missing", lambda c: ["evaluate", str(c.ckpt), "--data", "ev.jsonl", "--no-base"],
         lambda c: ["ev.jsonl", "not found"]),
    Case("evaluate-corpus-missing", lambda c: ["evaluate", str(c.ckpt), "--data", str(c.data), "--corpus", "cor.jsonl"],
         lambda c: ["cor.jsonl", "does not exist"]),
    Case("evaluate-corpus-invalid-utf8", lambda c: ["evaluate", str(c.ckpt), "--data", str(c.data), "--corpus", "cu.jsonl"],
         lambda c: ["cu.jsonl:2", "invalid UTF-8"], setup=lambda c: (c.work / "cu.jsonl").write_bytes(b'{"text": "a"}\n\xff\n')),
    Case("evaluate-dims-not-numbers", lambda c: ["evaluate", str(c.ckpt), "--data", str(c.data), "--dims", "abc"],
         lambda c: ["--dims", "abc"]),
    Case("evaluate-dims-too-large", lambda c: ["evaluate", str(c.ckpt), "--data", str(c.data), "--dims", "16,4096"],
         lambda c: ["dims", "[4096]", "embedding dim 32"]),
    Case("evaluate-output-exists", lambda c: ["evaluate", str(c.ckpt), "--data", str(c.data), "--output", "m.json"],
         lambda c: ["m.json", "exists", "--overwrite"], setup=lambda c: write(c.work / "m.json", "mine\n"),
         after=assert_unchanged("m.json", "mine\n")),
    Case("evaluate-output-is-dir", lambda c: ["evaluate", str(c.ckpt), "--data", str(c.data), "--output", "od"],
         lambda c: ["od", "directory"], setup=lambda c: (c.work / "od").mkdir()),
    # checkpoint saves
    Case("checkpoint-disk-full", lambda c: ["train", str(config(c))], lambda c: [str(c.work / "out" / "checkpoint-1"), NOSPC],
         patch=fail_write("vembed.training.checkpoint.save_rng", errno.ENOSPC), after=assert_not_created("out/checkpoint-1")),
    Case("checkpoint-read-only", lambda c: ["train", str(config(c))], lambda c: ["checkpoint-1", ROFS],
         patch=fail_write("vembed.training.checkpoint.save_rng", errno.EROFS)),
    Case("resume-changed-settings", lambda c: ["train", str(config(c, output_dir=str(c.work / "run"), lora_r=8,
                                                                resume_from_checkpoint="latest"))],
         lambda c: ["checkpoint-2", "cannot resume"], setup=lambda c: shutil.copytree(c.run, c.work / "run")),
    Case("resume-run-directory", lambda c: ["train", str(config(c, resume_from_checkpoint=str(c.run)))],
         lambda c: ["resume_from_checkpoint", "is a training run", str(c.ckpt)]),
    Case("resume-incomplete-checkpoint", lambda c: ["train", str(config(c, resume_from_checkpoint=str(c.work / "ck")))],
         lambda c: ["ck", "manifest.json"]),
    # pipeline (fails before anything runs)
    Case("pipeline-data-missing", lambda c: ["pipeline", "run", "--local", "--data", "missing.jsonl", "--output-dir", "p"],
         lambda c: ["missing.jsonl", "does not exist"], after=assert_not_created("p")),
    Case("pipeline-config-missing", lambda c: ["pipeline", "run", "--local", "--data", str(c.data), "--config", "nc.yaml",
                                               "--output-dir", "p"], lambda c: ["nc.yaml", "does not exist"]),
    Case("pipeline-no-local-flag", lambda c: ["pipeline", "run"], lambda c: ["--local"]),
    Case("pipeline-override-unknown-key", lambda c: ["pipeline", "run", "--local", "--config-override", "lorar=3",
                                                     "--output-dir", "p"], lambda c: ["lorar", "lora_r"],
         after=assert_not_created("p")),
    Case("pipeline-toleration-not-object", lambda c: ["pipeline", "compile", "--toleration", "[1]", "--output", "c.yaml"],
         lambda c: ["--toleration", "JSON object", "[1]"], after=assert_not_created("c.yaml")),
    Case("pipeline-compile-output-exists", lambda c: ["pipeline", "compile", "--output", "notes.yaml"],
         lambda c: ["notes.yaml", "not a compiled pipeline"], setup=lambda c: write(c.work / "notes.yaml", "mine\n"),
         after=assert_unchanged("notes.yaml", "mine\n")),
    Case("pipeline-rbac-output-exists", lambda c: ["pipeline", "rbac", "--namespace", "ns", "--output", "r.yaml"],
         lambda c: ["r.yaml", "exists", "--overwrite"], setup=lambda c: write(c.work / "r.yaml", "mine\n"),
         after=assert_unchanged("r.yaml", "mine\n")),
    Case("pipeline-submit-override-unknown-key", lambda c: ["pipeline", "submit", "--host", dead_url(), "--config-override",
                                                            "lorar=3", "--param", "data_uri=s3://b/x"],
         lambda c: ["lorar", "lora_r"]),
    Case("pipeline-submit-host-credentials", lambda c: ["pipeline", "submit", "--host", "http://alice:hunter2pass@127.0.0.1:1",
                                                        "--param", "data_uri=s3://b/x"],
         lambda c: ["--host http://127.0.0.1:1", "KFP_TOKEN"]),
    # demo (fails before it builds data or trains)
    Case("demo-output-holds-user-data", lambda c: ["demo", "--output-dir", "proj"],
         lambda c: ["proj/data/train.jsonl", "not written by vembed demo"],
         setup=lambda c: write(c.work / "proj" / "data" / "train.jsonl", "mine\n"),
         after=assert_not_created("proj/vembed_demo.json")),
    # registry
    Case("registry-sqlite-dir-missing", lambda c: ["registry", "show", "m"], lambda c: ["nodir", "does not exist"],
         env={"MLFLOW_TRACKING_URI": "sqlite:///{work}/nodir/x.db"}, after=assert_not_created("nodir")),
    Case("registry-default-store-missing", lambda c: ["registry", "show", "m", "--output-dir", "nostore"],
         lambda c: ["nostore", "mlflow.db"], after=assert_not_created("nostore")),
    Case("registry-server-down", lambda c: ["registry", "show", "m"], lambda c: ["cannot reach MLflow", "http://127.0.0.1:"],
         env={"MLFLOW_TRACKING_URI": "{dead}"}),
    Case("registry-server-down-redacted", lambda c: ["registry", "show", "m"], lambda c: ["[REDACTED]", "cannot reach MLflow"],
         env={"MLFLOW_TRACKING_URI": "{dead_auth}"}),
    Case("s3-endpoint-down", lambda c: ["prepare", "s3://bucket/raw.jsonl", "ds"], lambda c: ["cannot reach S3", "127.0.0.1"],
         env={"AWS_ENDPOINT_URL": "{dead}", "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s3cr3t-value",
              "AWS_DEFAULT_REGION": "us-east-1"}),
]


def _setup_special(case: Case, ctx: Ctx) -> None:
    """Cases whose setup needs the shared checkpoint copied and then damaged."""
    if case.id == "encode-corrupt-with-manifest":
        truncate(copy_ckpt(ctx) / "adapter_model.safetensors")
    elif case.id == "encode-truncated-no-manifest":
        d = copy_ckpt(ctx, "foreign")  # an adapter saved by another tool: no manifest, no trainer state
        for name in ("manifest.json", "trainer_state.json", "optimizer.safetensors", "rng.safetensors"):
            (d / name).unlink()
        truncate(d / "adapter_model.safetensors")
    elif case.id in ("encode-checkpoint-without-manifest", "resume-incomplete-checkpoint"):
        (copy_ckpt(ctx) / "manifest.json").unlink()
    elif case.id == "encode-pickle-refused":
        (copy_ckpt(ctx) / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")


@pytest.fixture(scope="module")
def trained(tiny_bert, tmp_path_factory) -> tuple[str, Path]:
    from tests.training.test_training import cfg_for
    from vembed.training import train

    root = tmp_path_factory.mktemp("bad-inputs")
    data = write_pairs(root / "d.jsonl", n=16)
    result = train(cfg_for(tiny_bert, data, root / "run", max_steps=2, save_steps=2, max_seq_length=16))
    return tiny_bert, result.checkpoint_dir


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, trained, tmp_path, monkeypatch, capsys):
    model, ckpt = trained
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    ctx = Ctx(work=work, ckpt=ckpt, run=ckpt.parent, model=model, data=Path(write_pairs(work / "train.jsonl", n=16)))
    for key in ("MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(key, raising=False)
    for key, value in case.env.items():
        monkeypatch.setenv(key, value.format(work=work, dead=dead_url(), dead_auth=dead_url("alice:hunter2pass@")))
    if case.setup:
        case.setup(ctx)
    _setup_special(case, ctx)
    argv = case.argv(ctx)  # may write the config file the command reads
    before = tree_hashes(work, ckpt.parent)
    if case.patch:
        case.patch(monkeypatch, ctx)
    capsys.readouterr()

    code = main(argv)

    out, err = capsys.readouterr()
    assert code == case.code, f"exit {code}; stderr: {err}"
    assert "Traceback" not in out + err
    lines = [line for line in err.splitlines() if line.startswith("error:")]  # on a line of its own
    assert len(lines) == 1, f"expected one error line, got: {err!r}"
    for needle in case.expect(ctx):
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    assert "hunter2pass" not in out + err and "s3cr3t-value" not in out + err
    after = tree_hashes(work, ckpt.parent)
    changed = [p for p, h in before.items() if after.get(p) != h]
    assert not changed, f"files changed or removed: {changed}"
    no_temp_left(work)
    no_temp_left(ckpt.parent)
    if case.after:
        case.after(ctx)


def test_suite_has_enough_cases():
    assert len(CASES) >= 40 and len({c.id for c in CASES}) == len(CASES)


# --- behaviours that are not failures --------------------------------------------------------


def test_merge_overwrite_replaces_only_an_earlier_merge(trained, tmp_path, monkeypatch):
    _, ckpt = trained
    monkeypatch.chdir(tmp_path)
    assert main(["merge", str(ckpt), "m"]) == 0
    (tmp_path / "m" / "stale.txt").write_text("from an older merge")
    assert main(["merge", str(ckpt), "m"]) == 2  # not empty: refused without --overwrite
    assert main(["merge", str(ckpt), "m", "--overwrite"]) == 0
    assert not (tmp_path / "m" / "stale.txt").exists()  # replaced whole
    assert (tmp_path / "m" / "vembed_merged.json").is_file()
    no_temp_left(tmp_path)


def test_merge_interrupted_leaves_nothing(trained, tmp_path, monkeypatch, capsys):
    _, ckpt = trained
    monkeypatch.chdir(tmp_path)

    def interrupted(directory):
        (Path(directory) / "half.bin").write_bytes(b"x" * 4096)
        raise KeyboardInterrupt

    monkeypatch.setattr("vembed.inference.export.write_manifest", interrupted)
    assert main(["merge", str(ckpt), "m"]) == 130
    assert "Traceback" not in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # neither the target nor a temporary sibling


def test_resume_latest_with_nothing_says_it_starts_fresh(trained, tmp_path, caplog):
    from tests.training.test_training import cfg_for
    from vembed.training import train

    model, _ = trained
    data = write_pairs(tmp_path / "d.jsonl", n=8)
    with caplog.at_level("WARNING", logger="vembed.training.checkpoint"):
        result = train(cfg_for(model, data, tmp_path / "out", max_steps=1, resume_from_checkpoint="latest"))
    assert result.global_step == 1
    assert any("starting fresh" in r.getMessage() and "latest" in r.getMessage() for r in caplog.records)


def test_unreachable_mlflow_fails_fast(monkeypatch):
    """Bounded wait: a dead server is reported by one quick check (marked transient, so pipeline
    steps retry it), not after MLflow's minutes of retries."""
    from vembed.artifacts.registry import Registry
    from vembed.errors import RegistryError

    calls = []
    import requests

    real_get = requests.get

    def counting_get(url, **kwargs):
        calls.append(kwargs.get("timeout"))
        return real_get(url, **kwargs)

    monkeypatch.setattr(requests, "get", counting_get)
    with pytest.raises(RegistryError, match="cannot reach MLflow") as info:
        Registry(dead_url())
    assert info.value.transient
    assert len(calls) == 1 and all(t <= 5 for t in calls[0])  # one request, each wait bounded


def test_pipeline_bad_data_fails_at_once_naming_step_and_line(tmp_path, capsys):
    """Bad data inside the pipeline (prepare's DataError) is permanent: no retry, and the terminal names
    the step and the `file:line` reason, in plain text when it is not a TTY."""
    from pipelines.cli import main as pipeline_main

    data = write(tmp_path / "raw.jsonl", '{"query": "a", "positive": "b"}\nnot json\n')
    before = tree_hashes(tmp_path)
    assert pipeline_main(["run", "--local", "--data", str(data), "--output-dir", str(tmp_path / "p")]) == 2
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "step prepare failed" in lines[0] and f"{data}:2: invalid JSON" in lines[0], err
    assert "\x1b[" not in out + err and "Traceback" not in err
    log = (tmp_path / "p" / "pipeline.log").read_text()
    assert log.count("Executing task 'prepare'") == 1 and "Retrying" not in log
    assert all(after == before[p] for p, after in tree_hashes(tmp_path).items() if p in before)


def test_steps_retry_transient_failures_only():
    """vembed.retry: a transient error (network, 5xx, throttling) is retried with backoff; a permanent
    one (bad data) ends the step at once with one `error:` line."""
    from vembed.errors import DataError, StorageError
    from vembed.retry import run_step

    slept: list[float] = []
    attempts = []

    def flaky():
        attempts.append(1)
        if len(attempts) < 3:
            err = StorageError("s3://b/k: S3 error SlowDown (HTTP 503)")
            err.transient = True
            raise err
        return "done"

    assert run_step(flaky, sleep=slept.append) == "done"
    assert len(attempts) == 3 and slept == [15.0, 30.0]

    calls = []

    def bad_data():
        calls.append(1)
        raise DataError("raw.jsonl:2: invalid JSON")

    with pytest.raises(SystemExit, match=r"^error: raw.jsonl:2: invalid JSON$"):
        run_step(bad_data, sleep=slept.append)
    assert calls == [1] and slept == [15.0, 30.0]  # no retry, no wait


def test_s3_throttling_and_5xx_are_transient_404_is_not():
    from botocore.exceptions import ClientError

    from vembed.artifacts.storage import _storage_error

    def client_error(code: str, status: int) -> ClientError:
        return ClientError({"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")

    assert _storage_error("s3://b/k", client_error("SlowDown", 503)).transient
    assert _storage_error("s3://b/k", client_error("InternalError", 500)).transient
    assert not _storage_error("s3://b/k", client_error("NoSuchKey", 404)).transient
    assert not _storage_error("s3://b/k", client_error("AccessDenied", 403)).transient


def test_config_override_is_repeatable(tmp_path, capsys):
    """`--config_override a=1 --config_override b=2` applies both (argparse's default kept only the last)."""
    from pipelines.cli import build_parser

    cfg = write(tmp_path / "c.yaml", "lora_r: 8\n")
    assert main(["config", "show", str(cfg), "--config_override", "lora_r=4", "--config-override", "lora_alpha=3"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert (shown["lora_r"], shown["lora_alpha"]) == (4, 3)
    args = build_parser().parse_args(["run", "--local", "--config-override", "epochs=2", "--config_override", "lora_r=4"])
    assert args.config_override == ["epochs=2", "lora_r=4"]


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (lambda ck, data: ["evaluate", ck, "--data", data, "--no-base", "--batch-size", "0"], "--batch-size"),
        (lambda ck, data: ["mine", data, "mined.jsonl", "--model", ck, "--batch-size", "-1"], "--batch-size"),
    ],
    ids=["evaluate-batch-size", "mine-batch-size"],
)
def test_out_of_range_numbers_are_refused_when_parsed(argv, flag, trained, tmp_path, monkeypatch, capsys):
    """Before the model loads, as a usage error naming the flag; not a traceback from deep inside."""
    _, ckpt = trained
    monkeypatch.chdir(tmp_path)
    data = write_pairs(tmp_path / "d.jsonl", n=4)
    with pytest.raises(SystemExit) as info:
        main(argv(str(ckpt), str(data)))
    err = capsys.readouterr().err
    assert info.value.code == 2 and f"argument {flag}: expected a positive integer" in err and "Traceback" not in err
    assert not (tmp_path / "mined.jsonl").exists()


def test_mine_interrupted_leaves_no_partial_output(trained, tmp_path, monkeypatch, capsys):
    """A crash while the mined file is written leaves nothing (a half file would pass for a dataset and
    make the rerun refuse it as existing)."""
    from vembed.data import mining

    _, ckpt = trained
    monkeypatch.chdir(tmp_path)
    data = write_pairs(tmp_path / "d.jsonl", n=8)
    real_write = mining.write_records

    def interrupted(records, path):
        def first_then_stop():
            yield records[0]
            raise KeyboardInterrupt

        return real_write(first_then_stop(), path)

    monkeypatch.setattr(mining, "write_records", interrupted)
    assert main(["mine", str(data), "mined.jsonl", "--model", str(ckpt), "--rank-start", "0", "--rank-end", "2"]) == 130
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl"]
    monkeypatch.setattr(mining, "write_records", real_write)
    assert main(["mine", str(data), "mined.jsonl", "--model", str(ckpt), "--rank-start", "0", "--rank-end", "2"]) == 0
    assert len((tmp_path / "mined.jsonl").read_text().splitlines()) == 8


def test_demo_reuses_its_own_output_dir(tmp_path):
    """The demo's refusal of foreign files (table case demo-output-holds-user-data) still lets it rerun
    into its own output dir."""
    from vembed.demo import claim_output_dir

    out = tmp_path / "demo"
    claim_output_dir(out)
    write(out / "data" / "train.jsonl", "{}\n")  # what the first run wrote
    write(out / "metrics.json", "{}\n")
    claim_output_dir(out)  # a rerun: no error
