"""Client subcommands: `optiforge models upload …`, `optiforge optimize …`, `optiforge infer …`.

They are part of the server's `optiforge` command and, on a machine with only this SDK,
`optiforge-client`. `--url` (or $OPTIFORGE_URL) says which server.
"""

from __future__ import annotations

import argparse
import json
import sys
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from pydantic import BaseModel

from optiforge_client import checks, options
from optiforge_client.budget import parse_budget
from optiforge_client.checks import UsageError
from optiforge_client.client import Client, default_url
from optiforge_client.errors import OptiforgeError
from optiforge_client.limits import MIN_TIME_BUDGET_MINUTES
from optiforge_client.models import Dataset, Job, Model
from optiforge_client.options import parse_objective, parse_objective_at
from optiforge_client.progress import following
from optiforge_client.reports import print_autotune_report, print_job_report, print_listing
from optiforge_client.tensors import ProtocolError

__all__ = [
    "add_client_commands",
    "main",
    "parse_budget",
    "parse_objective",
    "parse_objective_at",
    "run_client_command",
]


def _print_json(value: Any) -> None:
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    elif isinstance(value, list):
        value = [item.model_dump(mode="json") if isinstance(item, BaseModel) else item for item in value]
    print(json.dumps(value, indent=2, default=str))


def _check_choices(client: Client, args: argparse.Namespace) -> None:
    """Precisions and criteria are the server's (GET /v1/capabilities), never a copy kept here."""
    wanted = {
        "precision": getattr(args, "precision", None),
        "prune": getattr(args, "prune", None),
        "fuse": getattr(args, "fuse", None),
    }
    if not any(wanted.values()):
        return
    offered = client.capabilities()
    graph = offered.get("graph_optimization", {})
    choices = {
        "precision": offered["precisions"],
        "prune": [criterion["name"] for criterion in offered["prune_methods"]],
        "fuse": [*graph.get("modes", []), *(item["name"] for item in graph.get("model_types", []))],
    }
    for option, value in wanted.items():
        if value and value not in choices[option]:
            raise UsageError(f"--{option} {value}: the server offers {', '.join(choices[option])}")


def _recipe(args: argparse.Namespace) -> dict[str, Any]:
    """The recipe of `jobs create` and `optimize`: the --recipe file, overridden by the options."""
    recipe: dict[str, Any] = checks.recipe_file(args.recipe)
    if args.precision:
        recipe["precision"] = args.precision
    if args.target:
        recipe["targets"] = args.target
    if args.batch_sizes:
        recipe["batch_sizes"] = list(args.batch_sizes)
    if args.sequence_lengths:
        recipe["sequence_lengths"] = list(args.sequence_lengths)
    if args.prune:
        recipe["prune"] = {**recipe.get("prune", {}), "method": args.prune, "ratio": args.prune_ratio}
    if args.finetune_epochs:
        recipe["finetune"] = {**recipe.get("finetune", {}), "epochs": args.finetune_epochs}
    stated = {"num_heads": args.num_heads, "hidden_size": args.hidden_size}
    if args.fuse or any(stated.values()):
        graph = {**recipe.get("graph_optimization", {}), "model_type": args.fuse or "auto"}
        recipe["graph_optimization"] = {**graph, **{k: v for k, v in stated.items() if v is not None}}
    return recipe


def _wait_and_report(client: Client, job: Job, quiet: bool) -> int:
    with following(sys.stderr, quiet) as on_progress:
        job = client.wait_for_job(job.id, on_progress=on_progress)
    (print_autotune_report if job.kind == "autotune" else print_job_report)(client, job.id)
    return 0


def _run_search(
    client: Client, args: argparse.Namespace, model_id: str, calibration: Dataset | None, evaluation: Dataset
) -> int:
    """`optimize --budget …`: the auto-optimize search, a live line with the current best, then its table."""
    max_drop, relative = args.budget
    metric, batch_size, sequence_length = parse_objective_at(args.objective)
    space: dict[str, Any] = {"backends": args.target} if args.target else {}
    if args.precision:
        space["precisions"] = [args.precision]
    job = client.optimize(
        model_id,
        evaluation.id,
        calibration.id if calibration else None,
        objective=metric,
        batch_size=batch_size,
        sequence_length=sequence_length,
        max_drop=max_drop,
        budget_metric=args.budget_metric or ("top1" if evaluation.has_labels else "fidelity"),
        relative=relative,
        time_budget_minutes=args.time_budget,
        space=space,
        alias=args.alias,
    )
    if not args.wait:
        print(job.id)
        return 0
    with following(sys.stderr, args.quiet) as on_progress:
        job = client.wait_for_job(job.id, timeout=args.time_budget * 60 * 1.5 + 600, on_progress=on_progress)
    print_autotune_report(client, job.id)
    return 0


def _model(
    client: Client, source: str | Path, name: str | None, opset: int | None = None, wait: bool = True
) -> Model:
    """An uploaded model by id, or the model of this file: the stored one of the same bytes, else
    uploaded (a .pt2 converted on the server: with `wait`, until it is ready)."""
    model = (
        client.get_model(source)
        if isinstance(source, str)
        else client.find_or_upload_model(source, name, opset=opset)
    )
    if wait and model.status == "converting":
        print(f"model {model.id}: converting to ONNX (job {model.conversion_job_id})…", file=sys.stderr)
        model = client.wait_for_model(model.id)
    return model


def _dataset(client: Client, source: str | Path | None, what: str) -> Dataset | None:
    """An uploaded dataset by id, or the dataset of this file (the stored one of the same bytes,
    else uploaded), said on stderr."""
    if source is None:
        return None
    if isinstance(source, str):
        return client.get_dataset(source)
    dataset = client.find_or_upload_dataset(source)
    reused = " (already uploaded: reused)" if dataset.deduplicated else ""
    print(f"{what} {dataset.id}: {dataset.samples} samples{reused}", file=sys.stderr)
    return dataset


def cmd_upload_model(client: Client, args: argparse.Namespace) -> int:
    source = checks.existing_file(args.file, "model file")
    model = client.upload_model(source, args.name, opset=args.opset)
    if args.wait and model.status == "converting":
        model = client.wait_for_model(model.id)
    _print_json(model)
    return 0


def _tokenization(args: argparse.Namespace) -> dict[str, Any] | None:
    """The tokenization spec of `datasets upload` from its options (None: the server's defaults)."""
    spec = checks.json_object_file(args.tokenization, "--tokenization", '{"max_length": 128}')
    if args.max_length is not None:
        spec["max_length"] = args.max_length
    if args.padding:
        spec["padding"] = args.padding
    if args.no_truncation:
        spec["truncation"] = False
    if args.input_names:
        spec["input_names"] = [name.strip() for name in args.input_names.split(",") if name.strip()]
    if args.dtype:
        spec["dtype"] = args.dtype
    return spec or None


def cmd_upload_dataset(client: Client, args: argparse.Namespace) -> int:
    text_options = (args.tokenization, args.max_length, args.padding, args.no_truncation, args.input_names)
    if not args.tokenizer and (args.for_model or args.dtype or any(o for o in text_options)):
        raise UsageError("the tokenization options go with --tokenizer (a JSONL of texts)")
    preprocessing = options.merged(args.preprocessing)
    if args.tokenizer and (preprocessing or args.input_name):
        raise UsageError("--preprocessing and --input-name apply to a .zip of images, not to texts")
    source = checks.existing_file(args.file, "dataset file")
    if args.tokenizer:
        checks.existing_file(args.tokenizer, "--tokenizer")
    dataset = client.upload_dataset(
        source,
        name=args.name,
        preprocessing=preprocessing,
        input_name=args.input_name,
        tokenizer=args.tokenizer,
        tokenization=_tokenization(args) if args.tokenizer else None,
        model_id=args.for_model,
        classes=[name.strip() for name in args.classes.split(",")] if args.classes else None,
    )
    _print_json(dataset)
    return 0


def cmd_optimize(client: Client, args: argparse.Namespace) -> int:
    """Everything the options can tell is checked before the first byte goes up; files already
    uploaded (the same bytes) and ids (`mdl_…`, `ds_…`) are used as they are."""
    recipe = _recipe(args)
    model_source = checks.model_or_file(args.model, "model file")
    calib_source = checks.dataset_or_file(args.calib, "--calib")
    eval_source = checks.dataset_or_file(args.eval, "--eval")
    if args.budget:
        checks.check_search(
            eval_source is not None, args.time_budget, args.precision, calib_source is not None
        )
    else:
        checks.check_recipe_data(recipe, calib_source is not None, from_flag=args.precision is not None)
    _check_choices(client, args)
    model = _model(client, model_source, args.name)
    parameters = f"{model.parameters:,}" if model.parameters is not None else "?"
    reused = " (already uploaded: reused)" if model.deduplicated else ""
    print(f"model {model.id}: {model.name}, {parameters} parameters{reused}", file=sys.stderr)
    calibration = _dataset(client, calib_source, "calibration set")
    evaluation = _dataset(client, eval_source, "evaluation set")
    if args.budget:
        assert evaluation is not None  # check_search
        return _run_search(client, args, model.id, calibration, evaluation)
    job = client.create_job(
        model.id,
        recipe,
        calibration_dataset_id=calibration.id if calibration else None,
        evaluation_dataset_id=evaluation.id if evaluation else (calibration.id if calibration else None),
    )
    if not args.wait:
        print(job.id)
        return 0
    return _wait_and_report(client, job, args.quiet)


def cmd_create_job(client: Client, args: argparse.Namespace) -> int:
    recipe = _recipe(args)
    checks.check_recipe_data(recipe, args.calib is not None, from_flag=args.precision is not None)
    _check_choices(client, args)
    job = client.create_job(
        args.model_id, recipe, calibration_dataset_id=args.calib, evaluation_dataset_id=args.eval
    )
    _print_json(job)
    return 0


def _deleter(kind: str) -> Any:
    """`<kind> delete ID [--force]`: the server's 409 sentence (what holds it, and --force) is the
    error printed when it refuses."""

    def delete(client: Client, args: argparse.Namespace) -> int:
        getattr(client, f"delete_{kind}")(args.id, force=args.force)
        print(f"deleted {kind} {args.id}")
        return 0

    return delete


def cmd_infer(client: Client, args: argparse.Namespace) -> int:
    inputs: dict[str, np.ndarray] = {}
    for item in args.input:
        name, _, path = item.partition("=")
        if not path or not path.endswith(".npy"):
            raise UsageError(f"--input takes NAME=FILE.npy (one array per input), got {item!r}")
        try:
            inputs[name] = np.load(checks.existing_file(path, "--input"), allow_pickle=False)
        except ValueError as exc:
            raise UsageError(f"--input {path}: not a .npy array ({exc})") from None
    result = client.infer(args.name, inputs, binary=not args.json_tensors)
    if args.out:
        np.savez(args.out, **result.outputs)
    summary = {
        "model_version": result.model_version,
        "compute_ms": result.compute_ms,
        "queue_ms": result.queue_ms,
        "batch_size": result.batch_size,
        "outputs": {
            name: {"shape": list(array.shape), "dtype": array.dtype.name, "argmax": array.argmax(-1).tolist()}
            if array.ndim == 2
            else {"shape": list(array.shape), "dtype": array.dtype.name}
            for name, array in result.outputs.items()
        },
    }
    _print_json(summary)
    return 0


def cmd_triton(client: Client, args: argparse.Namespace) -> int:
    """Download the engines as one Triton model repository; print where it went and what it holds."""
    path = client.triton_repository(args.engines, args.out)
    with zipfile.ZipFile(path) as archive:
        models = sorted({name.split("/")[0] for name in archive.namelist()})
    _print_json({"path": str(path), "size_bytes": path.stat().st_size, "models": models})
    print(
        f"serve it: unzip {path} -d model_repository && tritonserver --model-repository=model_repository",
        file=sys.stderr,
    )
    return 0


def _list(rows: Sequence[BaseModel], columns: Sequence[str]) -> int:
    print_listing(rows, columns)
    return 0


def _report(client: Client, args: argparse.Namespace) -> int:
    """A job's report: an auto-optimize search's is its candidates (`autotune`), any other's
    the comparison of its engines with the original."""
    search = client.get_job(args.id).kind == "autotune" and not args.engines
    read = client.autotune_report if search else client.job_report
    if args.format == "json":
        _print_json(read(args.id))
    elif args.format == "md":
        sys.stdout.write(read(args.id, format="md"))
    elif search:
        print_autotune_report(client, args.id)
    else:
        print_job_report(client, args.id)
    return 0


def _commands() -> dict[str, Any]:
    """command path -> function(client, args)."""
    return {
        "models upload": cmd_upload_model,
        "models list": lambda c, a: _list(
            c.list_models(), ["id", "name", "status", "parameters", "macs", "size_bytes"]
        ),
        "models get": lambda c, a: _print_json(c.get_model(a.id)),
        "models delete": _deleter("model"),
        "datasets upload": cmd_upload_dataset,
        "datasets list": lambda c, a: _list(c.list_datasets(), ["id", "name", "samples", "has_labels"]),
        "datasets get": lambda c, a: _print_json(c.get_dataset(a.id)),
        "datasets delete": _deleter("dataset"),
        "jobs create": cmd_create_job,
        "capabilities": lambda c, a: _print_json(c.capabilities()),
        "jobs list": lambda c, a: _list(
            c.list_jobs(a.status, kind=a.kind, model_id=a.model_id),
            ["id", "kind", "model_id", "status", "progress", "stage"],
        ),
        "jobs get": lambda c, a: _print_json(c.get_job(a.id)),
        "jobs wait": lambda c, a: _wait_and_report(c, c.get_job(a.id), a.quiet),
        "jobs cancel": lambda c, a: _print_json(c.cancel_job(a.id)),
        "jobs delete": _deleter("job"),
        "jobs report": _report,
        "engines list": lambda c, a: _list(
            c.list_engines(model_id=a.model_id, job_id=a.job_id),
            ["id", "backend", "precision", "alias", "size_bytes"],
        ),
        "engines delete": _deleter("engine"),
        "engines get": lambda c, a: _print_json(c.get_engine(a.id)),
        "engines alias": lambda c, a: _print_json(c.set_alias(a.id, a.alias)),
        "engines batching": lambda c, a: _print_json(
            c.set_batching(a.id, a.max_batch_size, a.max_queue_delay_ms)
        ),
        "engines triton": cmd_triton,
        "engines download": lambda c, a: print(c.download_engine(a.id, a.out)),
        "optimize": cmd_optimize,
        "infer": cmd_infer,
    }


def _add_recipe_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", help="a JSON recipe file; the options below override it")
    parser.add_argument("--precision", help="one of the server's (optiforge capabilities)")
    parser.add_argument("--target", action="append", help="backend, e.g. onnxruntime-cpu (repeatable)")
    parser.add_argument("--batch-sizes", type=options.int_list, help="comma-separated, e.g. 1,8")
    parser.add_argument(
        "--sequence-lengths",
        type=options.int_list,
        help="a model with token inputs of dynamic length: time each batch size at each, e.g. 16,128",
    )
    parser.add_argument("--prune", help="a pruning criterion of the server's (optiforge capabilities)")
    parser.add_argument("--prune-ratio", type=float, default=0.5)
    parser.add_argument("--finetune-epochs", type=int)
    parser.add_argument(
        "--fuse",
        metavar="MODEL_TYPE",
        help="transformer graph optimization: auto (detected), or a model type of the server's "
        "(optiforge capabilities), e.g. bert",
    )
    parser.add_argument("--num-heads", type=int, help="with --fuse: attention heads, where detection fails")
    parser.add_argument("--hidden-size", type=int, help="with --fuse: hidden size, where detection fails")


def add_client_commands(sub: Any) -> None:
    """Add the client subcommands to an argparse subparsers object."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--url", default=None, help="the server (default: $OPTIFORGE_URL or http://127.0.0.1:8000)"
    )
    common.add_argument("--api-key", default=None, help="an API key (default: $OPTIFORGE_API_KEY)")

    def group(name: str, help: str) -> Any:
        return sub.add_parser(name, help=help).add_subparsers(dest="action", required=True)

    def leaf(parent: Any, path: str, help: str) -> argparse.ArgumentParser:
        parser = parent.add_parser(path.split()[-1], help=help, description=help, parents=[common])
        parser.set_defaults(client_command=path)
        return parser

    def deleting(parser: argparse.ArgumentParser, refused_while: str) -> None:
        parser.add_argument("id")
        parser.add_argument(
            "--force", action="store_true", help=f"delete it even though {refused_while} (refused without)"
        )

    models = group("models", "upload, list, get, delete models")
    upload = leaf(
        models, "models upload", "upload an .onnx (or .zip with external data), or a torch.export .pt2"
    )
    upload.add_argument("file")
    upload.add_argument("--name")
    upload.add_argument("--opset", type=int, help="a .pt2: the ONNX opset to convert to (18 or later)")
    upload.add_argument(
        "--wait", action="store_true", help="a .pt2: wait until it is converted (ready) or failed"
    )
    leaf(models, "models list", "list models")
    leaf(models, "models get", "describe a model (its status: ready, converting, failed)").add_argument("id")
    deleting(
        leaf(models, "models delete", "delete a model, its jobs and engines"),
        "any of its engines holds an alias",
    )

    datasets = group("datasets", "upload, list and delete datasets")
    upload = leaf(
        datasets,
        "datasets upload",
        "upload a .npz (inputs by name, optional labels), a .zip of images (one folder per class), "
        "or a JSONL of texts with --tokenizer",
    )
    upload.add_argument("file")
    upload.add_argument("--name")
    images = upload.add_argument_group("images (a .zip: one folder of images per class, or images alone)")
    images.add_argument(
        "--preprocessing",
        action="append",
        type=options.preprocessing_item,
        metavar="KEY=VALUE|JSON",
        help="how images become arrays, repeatable: size=[64,64] (height, width; default 224×224), "
        "resize=resize_shorter_then_center_crop|resize|none, resize_size=N, interpolation=bilinear, "
        "mean=[0.5,0.5,0.5], std=[0.5,0.5,0.5], channel_order=RGB|BGR|GRAY, layout=NCHW|NHWC, "
        "dtype=float32 (VALUE is read as JSON where it can be); or one JSON object, e.g. "
        '\'{"size": [64, 64], "channel_order": "GRAY"}\'',
    )
    images.add_argument(
        "--input-name", help="the model input the images feed (default: the model's only one)"
    )
    texts = upload.add_argument_group('texts (a JSONL: one {"text", "text_pair", "label"} per line)')
    texts.add_argument("--tokenizer", help="the tokenizer.json that tokenizes the texts")
    texts.add_argument(
        "--for-model", metavar="MODEL_ID", help="the model the arrays are made for and checked against"
    )
    texts.add_argument("--max-length", type=int, help="tokens per row (default: the model's, else 128)")
    texts.add_argument("--padding", choices=["max_length", "longest"], help="default: max_length")
    texts.add_argument("--no-truncation", action="store_true", help="refuse a line over max-length")
    texts.add_argument("--input-names", help="arrays to produce, e.g. input_ids,attention_mask")
    texts.add_argument("--dtype", choices=["int64", "int32"], help="default: the model's, else int64")
    texts.add_argument(
        "--tokenization", metavar="JSON_FILE", help="a tokenization spec; the options override it"
    )
    texts.add_argument("--classes", help="class names in the model's output order, comma-separated")
    leaf(datasets, "datasets list", "list datasets")
    leaf(datasets, "datasets get", "describe a dataset").add_argument("id")
    deleting(leaf(datasets, "datasets delete", "delete a dataset"), "a queued or running job uses it")

    jobs = group("jobs", "create, follow and read jobs")
    create = leaf(jobs, "jobs create", "start a job from a recipe")
    create.add_argument("model_id")
    create.add_argument("--calib", help="calibration dataset id")
    create.add_argument("--eval", help="evaluation dataset id")
    _add_recipe_options(create)
    listing = leaf(jobs, "jobs list", "list jobs, newest first")
    listing.add_argument("--status", action="append", help="queued, running, succeeded, … (repeatable)")
    listing.add_argument("--kind", help="optimize, autotune, …")
    listing.add_argument("--model-id")
    leaf(jobs, "jobs get", "a job's state").add_argument("id")
    wait = leaf(jobs, "jobs wait", "wait with a progress bar, then print the report")
    wait.add_argument("id")
    wait.add_argument("--quiet", action="store_true")
    leaf(jobs, "jobs cancel", "cancel a job").add_argument("id")
    deleting(
        leaf(
            jobs,
            "jobs delete",
            "delete a finished job with its engines and report (cancel a running one first)",
        ),
        "one of its engines holds an alias (the alias goes too)",
    )
    report = leaf(
        jobs, "jobs report", "the comparison table (an auto-optimize job: every candidate of the search)"
    )
    report.add_argument("id")
    report.add_argument(
        "--engines",
        action="store_true",
        help="an auto-optimize job: the table of the engines it kept, not of every candidate",
    )
    report.add_argument(
        "--format",
        choices=["table", "md", "json"],
        default="table",
        help="table: fitted to the terminal (the markdown when not a terminal); md; json",
    )

    engines = group("engines", "list engines, name them, batch them, export them to Triton, delete them")
    listing = leaf(engines, "engines list", "list engines")
    listing.add_argument("--model-id")
    listing.add_argument("--job-id")
    leaf(engines, "engines get", "an engine with its metrics").add_argument("id")
    deleting(leaf(engines, "engines delete", "delete an engine"), "it holds an alias (the alias goes too)")
    alias = leaf(engines, "engines alias", "point an alias at an engine")
    alias.add_argument("id")
    alias.add_argument("alias")
    batching = leaf(engines, "engines batching", "turn on dynamic batching")
    batching.add_argument("id")
    batching.add_argument("--max-batch-size", type=int, default=16)
    batching.add_argument("--max-queue-delay-ms", type=float, default=2.0)
    download = leaf(
        engines, "engines download", "download an engine: its file, or a zip of its files (OpenVINO's IR)"
    )
    download.add_argument("id")
    download.add_argument(
        "--out",
        help="the file to write, or a folder for the server's name (default: here, <id>-<backend>.<ext>)",
    )
    triton = leaf(engines, "engines triton", "download engines as one Triton model repository (zip)")
    triton.add_argument("engines", nargs="+", metavar="ENGINE", help="engine id or alias; a model each")
    triton.add_argument("--out", required=True, help="the zip to write, e.g. repo.zip")

    optimize = sub.add_parser(
        "optimize",
        help="upload a model (and data), optimize it, wait, print the report",
        description="Optimize a model: a recipe (--precision …), or with --budget the search for the "
        "fastest engine within an accuracy drop. Files already uploaded (the same bytes) are not sent "
        "again; ids of uploaded models and datasets (mdl_…, ds_…) are taken where files are.",
        parents=[common],
    )
    optimize.set_defaults(client_command="optimize")
    optimize.add_argument(
        "model", help=".onnx file, a torch.export .pt2 (converted first), or a model id mdl_…"
    )
    optimize.add_argument("--calib", help="calibration .npz or dataset id ds_… (needed for int8 and pruning)")
    optimize.add_argument("--eval", help="evaluation .npz or dataset id ds_… (default: the calibration set)")
    optimize.add_argument("--name")
    optimize.add_argument("--wait", action="store_true", help="follow the job and print the report")
    optimize.add_argument("--quiet", action="store_true", help="no progress line")
    optimize.add_argument(
        "--budget",
        type=options.budget,
        help="search for the fastest engine within this accuracy drop instead of running one recipe "
        "(needs --eval): 1%% or 1pt = one point, as is 0.01; a bare number above 0.2 is refused "
        "(0.5 would be 50 points: write 0.5pt); 1%%rel = 1%% of the original's score",
    )
    optimize.add_argument(
        "--objective",
        type=options.objective,
        default="latency@1",
        help="latency@BATCH, throughput@BATCH or size; latency@1x128: batch 1 at sequence length 128",
    )
    optimize.add_argument("--budget-metric", choices=["top1", "fidelity"], help="default: top1 with labels")
    optimize.add_argument(
        "--time-budget",
        type=float,
        default=30.0,
        help=f"minutes the search may take (at least {MIN_TIME_BUDGET_MINUTES:g})",
    )
    optimize.add_argument("--alias", help="give the chosen engine this alias")
    _add_recipe_options(optimize)

    capabilities = sub.add_parser(
        "capabilities", help="what the server offers: precisions, criteria, backends", parents=[common]
    )
    capabilities.set_defaults(client_command="capabilities")

    infer = sub.add_parser("infer", help="run inference on an engine id or alias", parents=[common])
    infer.set_defaults(client_command="infer")
    infer.add_argument("name", help="engine id, alias, or model id")
    infer.add_argument("--input", action="append", required=True, help="NAME=FILE.npy (repeatable)")
    infer.add_argument("--out", help="write the outputs to this .npz")
    infer.add_argument("--json-tensors", action="store_true", help="JSON instead of binary tensors")


def run_client_command(args: argparse.Namespace) -> int:
    """Run a parsed client subcommand. A user's mistake prints one line and no traceback: a
    command-line mistake found before sending (status 2), a server error with its code and
    sentence in the CLI's words, a file that cannot be read, an unreachable server (status 1)."""
    command = _commands()[args.client_command]
    url = default_url(args.url)
    try:
        with Client(url, api_key=args.api_key) as client:
            status = command(client, args)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OptiforgeError as exc:
        print(f"error: {checks.cli_message(exc)}", file=sys.stderr)
        return 1
    except httpx.HTTPError as exc:
        print(f"error: cannot reach optiforge at {url} ({exc}); set --url or OPTIFORGE_URL", file=sys.stderr)
        return 1
    except ProtocolError as exc:
        print(f"error: the server's answer does not follow the protocol: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # a file that vanished or cannot be read or written
        print(f"error: {exc.filename or ''}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(
            "interrupted (a job already started goes on: optiforge jobs cancel ID stops it)", file=sys.stderr
        )
        return 130
    return status if isinstance(status, int) else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="optiforge-client", description=__doc__.splitlines()[0])
    add_client_commands(parser.add_subparsers(dest="command", required=True))
    return run_client_command(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
