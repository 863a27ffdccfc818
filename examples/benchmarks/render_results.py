# Copyright 2026 The pal-rm authors. Licensed under the Apache License, Version 2.0.
"""
Writes the README's Results section from the benchmarks' JSON files: nothing in it is typed by hand.

```bash
python examples/benchmarks/render_results.py --collect   # copy outputs/benchmarks/*.json|png into examples/benchmarks/results/, render
python examples/benchmarks/render_results.py             # re-render from examples/benchmarks/results/
python examples/benchmarks/render_results.py --check     # exit 1 if the README is not what the JSON files give
```

The section sits between `<!-- results:start -->` and `<!-- results:end -->`.
"""

import argparse
import json
import os
import shutil
import sys

from pal_rm.utils import atomic_write

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
RESULTS_DIR = os.path.join(HERE, "results")
START, END = "<!-- results:start -->", "<!-- results:end -->"
BENCHMARKS = (
    "persona",
    "synthetic",
    "active",
    "downstream",
    "speed",
    "lora",
    "big_backbone",
    "checkpoints",
    "summary",
    "images",
    "grpo_with_pal",
)
SOURCES = {"grpo_with_pal": os.path.join("outputs", "examples")}  # default: outputs/benchmarks


def _fmt(value) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    return "\n".join(lines + ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows])


def _machine(result) -> str:
    m = result["machine"]
    return f"{m['cpu']}, {m['cpu_count']} cores, torch {m['torch']} ({result['wall_time_seconds'] / 60:.1f} min)"


def _image(name, results_dir) -> str:
    path = os.path.join(results_dir, f"{name}.png")
    if not os.path.exists(path):
        return ""
    return f"\n![{name}]({os.path.relpath(path, REPO)})\n"


def render_persona(result, results_dir) -> str:
    shots = result["shots"]
    parts = [
        f"### Persona (Anthropic persona statements, MiniLM frozen)\n\n`{result['command']}` on {_machine(result)}.\n"
    ]
    for name, setting in result["settings"].items():
        data = setting["data"]
        parts.append(
            f"**{name.capitalize()} setting** ({'Dirichlet-mixture' if data['mixture_users'] else 'pure-group'} users, "
            f"K* = {data['num_groups']}, {setting['users']['train']} seen users with {data['pairs_per_user']} "
            f"comparisons each, {setting['users']['unseen_test']} unseen users). Accuracy; bold: the PAL model chosen "
            "on seen-user validation accuracy.\n"
        )
        parts[-1] += "The oracle is also given the unseen users' true groups, so its unseen accuracy needs no shots.\n"
        rows = []
        for model, values in setting["models"].items():
            label = f"**{model}**" if model == setting["selected_pal"] else model
            unseen = values.get("unseen_accuracy")
            cells = (
                [values["unseen_accuracy_true_mixture"]] * len(shots)
                if unseen is None
                else [unseen[str(n)] for n in shots]
            )
            rows.append([label, values["seen_accuracy"], *cells])
        parts.append(table(["model", "seen users"] + [f"unseen, {n}-shot" for n in shots], rows))
        targets = setting["targets"]
        lines = []
        for target, met in targets["met"].items():
            lines.append(f"- {target}: {'met' if met else '**missed**'}")
        gaps = (
            f"(PAL - oracle: {targets['pal_minus_oracle_seen'] * 100:+.1f} points; PAL - one reward: "
            f"{targets['pal_minus_one_reward_seen'] * 100:+.1f} points; "
            + ", ".join(
                f"{k.replace('_', ' ')}: {v * 100:+.1f} points" for k, v in targets.items() if k.startswith("unseen")
            )
            + ")"
        )
        parts.append("\n" + "\n".join(lines) + f"\n\n{gaps}\n")
    parts.append(_image("persona", results_dir))
    return "\n".join(parts)


def render_synthetic(result, results_dir) -> str:
    config = result["config"]
    rows = []
    for run in result["runs"].values():
        bayes = run["bayes_optimal"]["test"]["realized"]
        for name, values in run["models"].items():
            rows.append(
                [
                    run["true_k"],
                    run["pairs_per_user"],
                    name,
                    values["seen_accuracy"],
                    bayes,
                    (values["seen_accuracy"] - bayes) * 100,
                    values["unseen_accuracy"],
                    run["bayes_optimal"]["unseen_test"]["realized"],
                ]
            )
    for row in rows:
        row[5] = f"{row[5]:+.1f}"
    met = "met" if result["met_within_1_point"] else "**missed**"
    return (
        f"### Synthetic (the paper's ideal-point simulation, d = {config['dim']})\n\n`{result['command']}` on "
        f"{_machine(result)}. Seen-user test accuracy against the Bayes-optimal accuracy of the true model on the same "
        f"labels; unseen users fitted on {config['unseen_shots']} comparisons.\n\n"
        + table(
            ["K*", "pairs/user", "model", "seen", "Bayes-optimal", "gap (points)", "unseen", "Bayes (unseen)"], rows
        )
        + f"\n\n- PAL-A within 1 point of Bayes-optimal for every K >= K* (every setting): {met}\n"
        + _synthetic_gaps(result)
        + _synthetic_unseen_gaps(result)
        + _image("synthetic", results_dir)
    )


def _synthetic_unseen_gaps(result) -> str:
    """Unseen users: PAL-A at K = K* against the Bayes-optimal accuracy on the unseen users' test labels."""
    gaps = []
    for run in result["runs"].values():
        model = run["models"].get(f"PAL-A K={run['true_k']}")
        if model is not None:
            bayes = run["bayes_optimal"]["unseen_test"]["realized"]
            gaps.append((run["true_k"], run["pairs_per_user"], (model["unseen_accuracy"] - bayes) * 100))
    if not gaps:
        return ""
    met = "met" if all(gap >= -1.5 for *_, gap in gaps) else "**missed**"
    listed = "; ".join(f"K*={k}, {pairs} pairs/user: {gap:+.1f}" for k, pairs, gap in gaps)
    shots = result["config"]["unseen_shots"]
    return (
        f"- unseen users ({shots} comparisons), PAL-A at K = K* minus Bayes-optimal, in points: {listed}. Within 1.5 "
        f"points everywhere: {met}\n"
    )


def render_active(result, results_dir) -> str:
    shots = [n for n in (1, 2, 3, 4, 5, 6, 8, 10) if str(n) in next(iter(result["settings"].values()))["random"]]
    rows, lines = [], []
    for name, setting in result["settings"].items():
        for kind in ("random", "active"):
            reach = setting["questions_to_seen_minus_3_points"][kind]
            rows.append(
                [
                    name,
                    setting["K"],
                    setting["seen_accuracy"],
                    kind,
                    *[setting[kind][str(n)] for n in shots],
                    reach if reach is not None else f"> {max(shots)}",
                ]
            )
        prior = setting["adaptation_prior"]
        chosen = (
            f"empirical, bandwidth {prior['bandwidth']:g}"
            if prior.get("method") == "empirical"
            else f"Gaussian, strength {prior.get('strength', 1):g}"
        )
        by_k = ", ".join(f"K={k}: {v:.3f}" for k, v in setting["validation_accuracy_by_K"].items())
        met = "; ".join(f"{t}: {'met' if ok else '**missed**'}" for t, ok in setting["met"].items())
        lines.append(
            f"- {name}: K chosen on validation ({by_k}); prior {chosen}; active reaches random's 10-answer accuracy "
            f"after {setting['active_questions_to_random_at_10'] or '> 10'} answers. {met}"
        )
    header = ["setting", "K", "seen users", "questions"] + [f"{n} answers" for n in shots] + ["to seen - 3 pts"]
    return (
        f"### Onboarding new users: chosen vs random questions (`examples/benchmarks/active.py`)\n\n`{result['command']}` "
        f'on {_machine(result)}. Mean per-user test accuracy of unseen users after n answers; "active" picks each '
        'question by mutual information given the answers so far (`select_comparisons`), "random" takes the first n '
        "of the same 50-comparison pool.\n\n" + table(header, rows) + "\n\n" + "\n".join(lines) + "\n"
    )


def _synthetic_gaps(result) -> str:
    """The largest gap to Bayes-optimal at K = K* and at K > K*, per number of comparisons per user."""
    lines = []
    for pairs in sorted({run["pairs_per_user"] for run in result["runs"].values()}):
        runs = [run for run in result["runs"].values() if run["pairs_per_user"] == pairs]
        worst = {"K = K*": 0.0, "K > K*": 0.0}
        for run in runs:
            bayes = run["bayes_optimal"]["test"]["realized"]
            for values in run["models"].values():
                if values.get("K", 0) >= run["true_k"]:
                    key = "K = K*" if values["K"] == run["true_k"] else "K > K*"
                    worst[key] = max(worst[key], (bayes - values["seen_accuracy"]) * 100)
        lines.append(
            f"- {pairs} comparisons per user: largest gap {worst['K = K*']:.1f} points at K = K*, "
            f"{worst['K > K*']:.1f} points at K > K*"
        )
    return "\n".join(lines) + "\n"


def render_speed(result, results_dir) -> str:
    cached, naive, scoring, users = (result[p] for p in ("cached", "naive", "scoring", "users"))
    adapt = result["adapt"]
    rows = [
        [
            "PAL-B training, embedding cache",
            f"{cached['seconds']:.1f} s",
            f"{cached['peak_rss_mb']:.0f} MB",
            cached["test_accuracy"],
        ],
        [
            "PAL-B training, naive loop (re-encodes every batch)",
            f"{naive['seconds']:.1f} s",
            f"{naive['peak_rss_mb']:.0f} MB",
            naive["test_accuracy"],
        ],
    ]
    targets = "\n".join(f"- {t}: {'met' if ok else '**missed**'}" for t, ok in result["targets"].items())
    return (
        f"### Speed (persona data, MiniLM frozen, {result['config']['epochs']} epochs)\n\n`{result['command']}` on "
        f"{_machine(result)}; each part in its own process.\n\n"
        + table(["run", "wall time", "peak RSS", "test accuracy"], rows)
        + f"\n\n- training speed-up of the cache: **{result['training_speedup']:.1f}x**\n"
        f"- fitting {adapt['users']:,} new users ({adapt['comparisons']:,} comparisons), all at once: "
        + ", ".join(f"{name} prior **{fit['seconds']:.2f} s**" for name, fit in adapt["fits"].items())
        + f" (plus {adapt['encode_new_texts_seconds']:.1f} s to encode their new texts once"
        + (
            f"; measured apart with `{adapt['measured']['command']}`, "
            f"{adapt['measured']['machine'].get('torch_threads', '?')} torch thread(s)"
            if "measured" in adapt
            else ""
        )
        + ")\n"
        f"- scoring a batch of {scoring['batch_size']} (median of alternating runs): PAL-A / backbone forward = "
        f"**{scoring['pal_a_over_backbone']:.3f}**; PAL-B / backbone on items and prompts = "
        f"{scoring['pal_b_over_backbone_items_and_prompts']:.3f}; PAL-B / backbone on items only = "
        f"{scoring['pal_b_over_backbone']:.3f} (PAL-B also encodes the prompt)\n"
        f"- {users['registered_users']:,} registered users: RSS {users['rss_before_mb']:.0f} MB -> "
        f"{users['rss_after_mb']:.0f} MB, registered in {users['register_seconds']:.1f} s, one lookup "
        f"{users['lookup_seconds'] * 1e3:.2f} ms\n\n{targets}\n"
        + _image("speed", results_dir)
        + _render_many_users(result)
    )


def _render_many_users(result) -> str:
    """The speed benchmark's `many_users` part, when it has run."""
    scale = result.get("many_users")
    if scale is None:
        return ""
    measured = scale.get("measured", {"command": result["command"], "machine": result["machine"]})
    machine = measured["machine"]
    few, many, dense = scale["few_users"], scale["many_users"], scale["many_users_dense"]
    rows = [
        [
            f"{table['users']:,}",
            "per batch (sparse)" if table["sparse"] else "dense",
            f"{table['setup_seconds']:.1f} s",
            f"{table['step_seconds_median'] * 1e3:.1f} ms",
        ]
        for table in (few, many, dense)
    ]
    return (
        f"\n#### {many['users']:,} users x {scale['comparisons']:,} comparisons (random features, no backbone)\n\n"
        f"`{measured['command']}` on {machine['cpu']}, {machine['cpu_count']} cores, torch {machine['torch']}, "
        f"{scale['torch_threads']} thread; PAL-B (K = 4) on {scale['feature_dim']}-dimensional pooled features, batch 64; "
        "the trainers take turns, medians over every step.\n\n"
        + table(["users", "user-table updates", "trainer set-up", "median training step"], rows)
        + f"\n\n- step time with {many['users']:,} users / {few['users']:,} users: "
        f"**{scale['step_ratio_many_over_few']:.2f}x** (dense user-table updates: "
        f"{scale['step_ratio_dense_over_few']:.2f}x)\n"
        f"- per-user evaluation of {many['evaluated_users']:,} users on {scale['comparisons']:,} comparisons: "
        f"{many['evaluate_seconds']:.1f} s; peak RSS of the whole part {scale['peak_rss_mb']:.0f} MB\n"
    )


def render_summary(result, results_dir) -> str:
    shots = result["config"]["unseen_shots"]
    rows = []
    for name, values in result["models"].items():
        unseen = values.get("unseen_accuracy", {}).get(str(shots), values.get("unseen_accuracy_true_mixture"))
        rows.append([name, values["seen_accuracy"], unseen])
    where = (
        "the small offline fixture (a pipeline check, not a result)"
        if result["source"] == "fixture"
        else result["source"]
    )
    sizes = ", ".join(f"{k} {v:,}" for k, v in result["sizes"].items())
    expected = result["expected_sizes_full_data"]
    return (
        f"### Reddit TL;DR (Li et al. 2024 protocol)\n\n`{result['command']}` on {where}, {_machine(result)}; sizes: "
        f"{sizes}.\n\n"
        + table(["model", "seen users", f"unseen, {shots}-shot"], rows)
        + f"\n\nWith network: `python examples/benchmarks/summary.py --source openai/summarize_from_feedback "
        f"--drop_ties false` (expected seen-user sizes {expected['train']:,} / {expected['validation']:,} / "
        f"{expected['test']:,}).\n"
    )


def render_images(result, results_dir) -> str:
    shots = result["shots"]
    rows = []
    for name, values in result["models"].items():
        label = f"**{name}**" if name == result["selected_pal"] else name
        rows.append([label, values["seen_accuracy"]] + [values["unseen_accuracy"][str(n)] for n in shots])
    ceiling = result["true_model_accuracy"]
    rows.append(["true model (ceiling)", ceiling["test"]] + [ceiling["unseen_test"]] * len(shots))
    sizes = ", ".join(f"{k} {v:,}" for k, v in result["data"]["sizes"].items())
    return (
        f"### Image preferences (warm / cool colour filters, offline)\n\n`{result['command']}` on {_machine(result)}; "
        f"sizes: {sizes}. Procedurally drawn images with Pick-a-Filter's warm and cool filters "
        "(`pal_rm.data.load_color_filter_preferences`), two user groups and mixture users; the backbone is "
        f"{result['backbone']}, read through its real image processor. A check that the image pipeline works end to "
        "end, not a measure of image understanding. Accuracy; bold: the PAL model chosen on seen-user validation "
        "accuracy; unseen users fitted on n of their comparisons.\n\n"
        + table(["model", "seen users"] + [f"unseen, {n}-shot" for n in shots], rows)
        + "\n"
    )


def render_downstream(result, results_dir) -> str:
    n, counts = result["n"], result["questions"]
    accuracy = result["pairwise_accuracy"]
    rows = [
        [name, accuracy[name]["test"], values["test"], accuracy[name]["unseen_test"], values["unseen_test"]]
        for name, values in result["agreement"].items()
    ]
    rows.append([f"chance (1/{n})", 0.5, 1 / n, 0.5, 1 / n])
    lore = result["lore"]
    return (
        f"### Best-of-{n} on the demo data (`examples/benchmarks/downstream.py`)\n\n`{result['command']}` on "
        f"{_machine(result)}. Reward accuracy predicts downstream quality only weakly, so this asks what best-of-n "
        f"reranking asks: for each test comparison ({counts['test']:,} of seen users, {counts['unseen_test']:,} of "
        f"new users fitted on their few-shot comparisons), {n} notes on the topic (its two responses and {n - 2} "
        "others) are scored for the user, and the share of picks that are the user's true best (from their true "
        "property weights) is reported, next to the pairwise accuracy on the same comparisons. PAL-B is the demo "
        f"recipe (K = 4); LoRe's rank and L2 were chosen on seen-user validation accuracy (rank {lore['rank']}, L2 "
        f"{lore['l2']:g}); all on the frozen MiniLM's features.\n\n"
        + table(["model", "seen: accuracy", f"seen: best-of-{n}", "new: accuracy", f"new: best-of-{n}"], rows)
        + "\n"
    )


def render_big_backbone(result, results_dir) -> str:
    m, backbone, results = result["machine"], result["backbone"], result["results"]
    labels = {
        "automodel": "`AutoModel.from_pretrained` (the backbone alone)",
        "from_backbone": "`PalRewardModel.from_backbone`",
        "rebuild": "a random backbone built first, then replaced (what `from_backbone` did before)",
    }
    rows = [
        [
            labels[kind],
            f"{results[kind]['peak_rss_mb']:.0f}",
            results[kind]["peak_rss_mb"] / results["automodel"]["peak_rss_mb"],
        ]
        for kind in ("automodel", "from_backbone", "rebuild")
    ]
    return (
        f"### Wrapping a big backbone (`examples/benchmarks/big_backbone.py`)\n\n`{result['command']}` on {m['cpu']}, "
        f"{m['cpu_count']} cores, torch {m['torch']}: a random {backbone['architecture'].split()[0]} of "
        f"{backbone['parameters'] / 1e6:.0f}M parameters saved in {backbone['dtype']}, loaded with "
        f"`dtype=torch.bfloat16`, each way in its own interpreter. PAL's own parameters: "
        f"{', '.join(results['from_backbone']['pal_parameter_dtypes'])}.\n\n"
        + table(["load", "peak RSS (MB)", "ratio to the backbone alone"], rows)
        + f"\n\nTarget: at most {result['target_peak_rss_ratio']}x.\n"
    )


def render_lora(result, results_dir) -> str:
    config = result["config"]
    rows = [
        [
            name,
            row["validation_accuracy"],
            row["test_accuracy"],
            f"{row['seconds_per_step']:.2f}",
            f"{row['train_seconds'] / 60:.1f}",
            f"{row['peak_rss_mb']:.0f}",
            f"{row['trainable_parameters']:,}",
        ]
        for name, row in result["results"].items()
    ]
    targets = "\n".join(
        f"- {name}: {target['value']:.3f} ({'met' if target['met'] else 'MISSED'})"
        for name, target in result["targets"].items()
    )
    return (
        f"### LoRA on a decoder backbone (`examples/benchmarks/lora.py`)\n\n`{result['command']}` on "
        f"{_machine(result)}. {result['backbone']}; persona standard setting reduced for CPU: {result['users']} seen "
        f"users ({config['users_per_group']} per group, K* = 4), {result['sizes']['train']} train / "
        f"{result['sizes']['validation']} validation / {result['sizes']['test']} test comparisons. LoRA rank "
        f"{config['lora_r']} on the attention of the last {config['lora_layers']} layers, learning rate "
        f"{config['lora_learning_rate']}, {config['epochs']:g} epochs, batch {config['batch_size']}, the same for PAL "
        f"and TRL; the frozen PAL-B trains its heads {config['frozen_epochs']:g} epochs on cached features, and PAL-B "
        "+ LoRA starts from that model (s / step: its LoRA stage). TRL: "
        "`RewardTrainer` + `AutoModelForSequenceClassification` (one reward for everyone); its accuracy is computed "
        "like PAL's, from every pair. Seen users; peak RSS per system (each in its own process).\n\n"
        + table(
            ["system", "validation acc.", "test acc.", "s / step", "train (min)", "peak RSS (MB)", "trainable"],
            rows,
        )
        + "\n\n"
        + targets
        + "\n"
    )


def render_checkpoints(result, results_dir) -> str:
    m, backbone, lora = result["machine"], result["backbone"], result["lora"]
    labels = {
        "full": "full (backbone weights included)",
        "reference": "frozen backbone by reference",
        "lora_adapter": "LoRA adapter + reference to the base",
        "lora_merged": "LoRA merged into the backbone",
    }
    rows = [
        [
            labels.get(row["layout"], row["layout"]),
            f"{row['size_mb']:.1f}",
            f"{row['save_seconds']:.2f}",
            f"{row['load_seconds']:.2f}",
            "yes" if row["bit_identical"] else "no",
        ]
        for row in result["results"]
    ]
    return (
        f"### Checkpoint layouts (`examples/benchmarks/checkpoints.py`)\n\n`{result['command']}` on {m['cpu']}, "
        f"{m['cpu_count']} cores, torch {m['torch']}: a random {backbone['architecture'].split()[0]} of "
        f"{backbone['parameters'] / 1e6:.0f}M parameters in {backbone['dtype']}, LoRA rank {lora['rank']} on "
        f"{', '.join(lora['target_modules'])} ({lora['parameters'] / 1e6:.2f}M parameters), {result['users']} users. "
        "Rewards after reloading are compared with the saved model's (the merged layout with an in-memory merge).\n\n"
        + table(["layout", "size (MB)", "save (s)", "load (s)", "bit-identical rewards"], rows)
        + "\n"
    )


def render_grpo_with_pal(result, results_dir) -> str:
    target = result["target"]
    other = next(name for name in result["users"] if name != target)
    config = result["config"]
    first, last = result["train_reward_first_steps"], result["train_reward_last_steps"]
    before, after = result["held_out_before"], result["held_out_after"]
    window = max(1, len(result["per_step"]) // 4)
    comparisons = (
        (f"training batches, first / last {window} steps", first, last),
        (f"held-out requests ({config['num_eval_requests']} x 2 samples)", before, after),
    )
    rows = [
        [label, *(value for r in (start, end) for value in (r[target], r[other], r[target] - r[other]))]
        for label, start, end in comparisons
    ]
    header = [
        "mean PAL reward",
        f"{target}, before",
        f"{other}, before",
        "difference",
        f"{target}, after",
        f"{other}, after",
        "difference",
    ]
    return (
        f"### GRPO with a personalized PAL reward (`examples/grpo_with_pal.py`)\n\nSmolLM2-135M-Instruct trained with "
        f"TRL's `GRPOTrainer` for {config['max_steps']} steps ({config['prompts_per_step']} requests x "
        f"{config['num_generations']} completions per step, learning rate {config['learning_rate']:g}) on CPU, rewarded "
        f"by the demo PAL-B model for the **{target}** user; the {other} user's reward is logged on the same completions "
        f"with weight 0. A positive change in the difference column "
        f"means the policy moved towards the {target} user's taste.\n\n" + table(header, rows) + "\n"
    )


def render(results_dir: str = RESULTS_DIR) -> str:
    sections = [
        "_Generated by `python examples/benchmarks/render_results.py` from `examples/benchmarks/results/*.json`; "
        "rerun a benchmark, then `render_results.py --collect`._\n"
    ]
    for name in BENCHMARKS:
        path = os.path.join(results_dir, f"{name}.json")
        if os.path.exists(path):
            with open(path) as file:
                sections.append(globals()[f"render_{name}"](json.load(file), results_dir))
        else:
            script = f"examples/{name}.py" if name in SOURCES else f"examples/benchmarks/{name}.py"
            sections.append(f"### {name}\n\nNot run yet: `python {script}`.\n")
    return "\n".join(sections)


def update_readme(readme: str, body: str) -> str:
    if START not in readme or END not in readme:
        raise ValueError(f"The README has no {START} ... {END} markers.")
    head, rest = readme.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{body.strip()}\n{END}{tail}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--collect", action="store_true", help="Copy outputs/benchmarks/*.json|png first.")
    parser.add_argument("--source_dir", default=os.path.join(REPO, "outputs", "benchmarks"))
    parser.add_argument("--results_dir", default=RESULTS_DIR)
    parser.add_argument("--readme", default=os.path.join(REPO, "README.md"))
    parser.add_argument("--check", action="store_true", help="Fail if the README differs from the rendering.")
    args = parser.parse_args(argv)
    if args.collect:
        os.makedirs(args.results_dir, exist_ok=True)
        for name in BENCHMARKS:
            for extension in ("json", "png"):
                folder = os.path.join(REPO, SOURCES[name]) if name in SOURCES else args.source_dir
                source = os.path.join(folder, f"{name}.{extension}")
                if os.path.exists(source):
                    shutil.copyfile(source, os.path.join(args.results_dir, f"{name}.{extension}"))
    with open(args.readme, encoding="utf-8") as file:
        readme = file.read()
    updated = update_readme(readme, render(args.results_dir))
    if args.check:
        if updated != readme:
            print("The README's Results section is not what the JSON files give; run render_results.py.")
            return 1
        return 0
    with atomic_write(args.readme) as file:
        file.write(updated)
    print(f"Rendered the Results section of {args.readme}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
