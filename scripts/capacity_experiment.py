#!/usr/bin/env python3
"""Issue 31, the capacity-limited regime: at a fixed budget of unique block parameters, does a
deep shared / LORS stack beat every vanilla model once each parameter sees enough tokens?

The arms, budgets and schedule live here; `plan` writes them out as sweep plans, and
`lors-lm sweep` trains, evaluates and reports (docs/results.md, "The capacity-limited regime").

    scripts/capacity_experiment.py plan     # write configs/capacity.toml, configs/capacity-2p.toml
    scripts/capacity_experiment.py data     # Moby Dick + Brown as bytes -> data/mobybrown-bytes
    scripts/capacity_experiment.py time     # time every arm (bench, 2 threads / 2 jobs x 1 thread),
                                            # estimate the grid's hours
    scripts/capacity_experiment.py run      # the grid (resumable: run it again after any stop)
    scripts/capacity_experiment.py smoke    # the same pipeline end to end, a few steps per run

Budget P = the block parameters of a 2-layer vanilla stack at d_model 64 (SwiGLU 172, byte
vocabulary): 98,816. Every arm at P is sized to P within 5 % (`match_by = "block"` checks it);
every arm at a budget trains on the same tokens (tokens per block parameter x P), so rows of
one budget compare at equal data. Token budgets 10, 30, 100 and 200 tokens per unique block
parameter; the 200 run of each arm is trained once with a warmup-stable-decay schedule and the
shorter budgets are its decay branches (`branch_of`): they continue its checkpoint at the step
where their own decay starts, so each (arm, seed) costs one long run plus three short decays.
200 tokens per parameter = 19.8M tokens = 3.05 epochs of the 6.49M-byte train split: no text is
repeated more than ~3 times.

Options: --lors-lm PATH (default target/release/lors-lm, else $CARGO_TARGET_DIR/release/lors-lm),
--jobs N for `run` (default 2: two single-thread jobs side by side; `time` measures whether that
is faster than one two-thread job on this machine).
"""
import argparse, json, os, statistics, subprocess, sys, tempfile, time, tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
V = 257  # byte-level vocabulary: 256 bytes + <|endoftext|>
SEQ, BATCH = 256, 16
TOKENS_PER_STEP = SEQ * BATCH
BUDGETS = [10, 30, 100, 200]  # tokens per unique block parameter
DATA = "data/mobybrown-bytes"


def ffn(d):
    """SwiGLU width 8/3 d, rounded up to a multiple of 2 (172 at d 64)."""
    return int(round(8 * d / 3 / 2 + 0.25)) * 2


def block(d, f):
    """Weights of one block, no GQA: q, k, v, o (d x d) + gate, up, down (d x f)."""
    return 4 * d * d + 3 * d * f


P = 2 * block(64, 172)  # 98,816


# name, mode, d, layers, heads, ffn, extra --set keys, what it is
def arm(name, mode, d, layers, heads, f, extra=(), note="", match=True, budgets=None):
    """An arm; `budgets`: its tokens per block parameter (default: the plan's), the largest
    trained once, the others its decay branches."""
    return dict(name=name, mode=mode, d=d, layers=layers, heads=heads, ffn=f, extra=list(extra), note=note,
                match=match, budgets=budgets)


# The LORS paper's rank shape (its DeiT config): attention rank rising with depth, FFN rank
# falling, at the uniform arm's total.
A8_PAPER, F8_PAPER = [2, 3, 4, 5, 5, 6, 7, 8], [8, 7, 6, 5, 5, 4, 3, 2]  # mean 5 each
A16_PAPER = [1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5]  # mean 3
F16_PAPER = [4, 3, 3, 3, 2, 2, 2, 2, 2, 2, 2, 1, 1, 1, 1, 1]  # mean 2

# 16-layer arms stop at 100 tokens per parameter: at 200 each would cost as much as two
# 8-layer arms (docs/results.md, "The capacity-limited regime", has the hours).
UP_TO_100 = [10, 30, 100]

ARMS_P = [
    arm("a-van2", "vanilla", 64, 2, 4, 172, note="(a) vanilla, 2 layers, wide: defines P"),
    arm("b-van8-d32", "vanilla", 32, 8, 2, 86, note="(b) vanilla, 8 thin layers"),
    arm("c-shared8", "shared", 64, 8, 4, 172, match=False,
        note="(c) fully shared, 8 layers at d_model 64: (d) without its private terms, so P/2 unique parameters "
             "at (d)'s width and FLOPs (a fully shared stack of P would need d_model ~88 and 1.7x the FLOPs; "
             "(e)'s two shared blocks are sharing at exactly P)"),
    arm("c-shared16", "shared", 64, 16, 4, 172, match=False, budgets=UP_TO_100,
        note="(c) fully shared, 16 layers at d_model 64 (P/2)"),
    arm("d-lors8-r5", "lors", 64, 8, 4, 172, ["lors.rank=5"], "(d) LORS, one base, 8 layers, uniform rank 5"),
    arm("d-lors8-paper", "lors", 64, 8, 4, 172,
        [f"lors.attn_rank_schedule={A8_PAPER}", f"lors.ffn_rank_schedule={F8_PAPER}"],
        "(d) LORS 8 layers, the paper's schedule (attention rank rising, FFN falling; same total)"),
    arm("d-lors16-r3r2", "lors", 64, 16, 4, 172, ["lors.attn_rank=3", "lors.ffn_rank=2"],
        "(d) LORS, one base, 16 layers, uniform over layers (attention 3, FFN 2)", budgets=UP_TO_100),
    arm("d-lors16-paper", "lors", 64, 16, 4, 172,
        [f"lors.attn_rank_schedule={A16_PAPER}", f"lors.ffn_rank_schedule={F16_PAPER}"],
        "(d) LORS 16 layers, the paper's schedule", budgets=UP_TO_100),
    arm("e-shared8-g2", "shared", 64, 8, 4, 172, ["lors.groups=2"],
        "(e) two shared blocks, each used by 4 consecutive layers (exactly P)"),
    arm("e-lors8-g2-d56", "lors", 56, 8, 4, 150, ["lors.groups=2", "lors.rank=3"],
        "(e) the same with private rank-3 terms, at d_model 56 so that bases + terms fit P"),
    arm("e-shared16-g2", "shared", 64, 16, 4, 172, ["lors.groups=2"],
        "(e) 16 layers in 2 groups of 8 (exactly P)", budgets=UP_TO_100),
    arm("e-lors16-g2-d56", "lors", 56, 16, 4, 150, ["lors.groups=2", "lors.attn_rank=2", "lors.ffn_rank=1"],
        "(e) 16 layers in 2 groups with private terms (attention 2, FFN 1), d_model 56", budgets=UP_TO_100),
    arm("f-van8-d64", "vanilla", 64, 8, 4, 172, match=False,
        note="(f) vanilla 8 layers at the LORS arms' width: 4P, the training FLOPs of (c)/(d)/(e) at d_model 64"),
]

# The second budget, 2P, for the arms that decide the question: both vanilla references and
# the grouped arm with private terms, at 30 and 100 tokens per block parameter.
ARMS_2P = [
    arm("a-van2-2p", "vanilla", 88, 2, 4, 256, note="(a) at 2P"),
    arm("b-van8-d44-2p", "vanilla", 44, 8, 2, 124, note="(b) at 2P"),
    arm("e-lors8-g2-d80-2p", "lors", 80, 8, 4, 212, ["lors.groups=2", "lors.rank=4"],
        "(e) two shared blocks with private rank-4 terms at 2P"),
]
BUDGETS_2P = [30, 100]


def lors_extra_params(a):
    """Unique block parameters of an arm (closed form, as ParamCounts)."""
    d, n, f = a["d"], a["layers"], a["ffn"]
    sets = dict(s.split("=", 1) for s in a["extra"])
    groups = int(sets.get("lors.groups", 1))
    if a["mode"] == "vanilla":
        return n * block(d, f)
    shared = groups * block(d, f)
    if a["mode"] == "shared":
        return shared
    attn_io, ffn_io = 4 * 2 * d, 3 * (d + f)
    if "lors.attn_rank_schedule" in sets:
        ra, rf = json.loads(sets["lors.attn_rank_schedule"]), json.loads(sets["lors.ffn_rank_schedule"])
    else:
        r = int(sets.get("lors.rank", 0))
        ra = [int(sets.get("lors.attn_rank", r))] * n
        rf = [int(sets.get("lors.ffn_rank", r))] * n
    return shared + sum(attn_io * x for x in ra) + sum(ffn_io * x for x in rf)


def steps_for(tokens_per_param, budget):
    return round(tokens_per_param * budget / TOKENS_PER_STEP)


def plan_text(title, prefix, arms, budgets, budget, seeds=(1, 2)):
    top = budgets[-1]
    base_name = f"{arms[0]['name']}-t{top}"
    refs = arms[:2]  # the vanilla models at the budget, (a) and (b)
    compare = [(f"{a['name']}-t{b}", f"{r['name']}-t{b}") for b in reversed(budgets) for a in arms[2:]
               if b in (a["budgets"] or budgets) and a["match"] for r in refs]
    lines = [
        f"# Generated by scripts/capacity_experiment.py plan: edit the script, not this file.",
        f"# Issue 31: {title}. Budget {budget} unique block parameters; each arm trains",
        f"# {', '.join(str(b) for b in budgets)} tokens per block parameter x {budget} tokens (the same for every arm),",
        f"# the longest with a warmup-stable-decay schedule, the others its decay branches.",
        f"#   scripts/capacity_experiment.py run       (or: lors-lm sweep --plan THIS --jobs 2)",
        f"title = {json.dumps(title)}",
        f"seeds = {list(seeds)}",
        f"baseline = {json.dumps(base_name)}",
        f'charts_prefix = "{prefix}"',
        'match_by = "block"',
        "# Every arm at P against both vanilla models at P, at the same token budget.",
        "compare = [\n" + "".join(f"    [{json.dumps(x)}, {json.dumps(y)}],\n" for x, y in compare) + "]",
        "",
        "[base.model]",
        "vocab_size = 0",
        "d_model = 64\nn_layers = 2\nn_heads = 4\nffn_hidden = 172",
        f"max_seq_len = {SEQ}",
        "tie_embeddings = true",
        "",
        "[base.lors]",
        'mode = "vanilla"\nrank = 4\ngroups = 1',
        "",
        "[base.train]",
        f"batch_size = {BATCH}\nseq_len = {SEQ}",
        f"max_steps = {steps_for(top, budget)}",
        "lr = 3e-3\nmin_lr = 3e-4\nwarmup_steps = 50",
        'schedule = "wsd"\ndecay_frac = 0.2',
        "weight_decay = 0.1\ngrad_clip = 1.0",
        "eval_interval = 250\neval_batches = 8",
        "ckpt_interval = 500\nkeep_checkpoints = 1",
        "",
        "[base.data]",
        f'dir = "{DATA}"',
        "",
        "# --smoke: every run and branch of the plan, 1 % of its steps (at least 2), short windows.",
        "[smoke]",
        f"seeds = {list(seeds)}",
        "steps_scale = 0.01",
        'set = ["train.batch_size=2", "train.seq_len=64", "train.eval_interval=5", "train.eval_batches=1", "train.ckpt_interval=0"]',
    ]
    for a in arms:
        sets = [f'"lors.mode={a["mode"]}"', f'"model.d_model={a["d"]}"', f'"model.n_layers={a["layers"]}"',
                f'"model.n_heads={a["heads"]}"', f'"model.ffn_hidden={a["ffn"]}"']
        sets += [json.dumps(s) for s in a["extra"]]
        unique = lors_extra_params(a)
        lines.append("")
        lines.append(f"# {a['note']}: {unique} unique block parameters ({100 * (unique / budget - 1):+.1f} % of {budget})")
        mine = a["budgets"] or budgets
        for b in reversed(mine):
            lines.append("[[run]]")
            lines.append(f'name = "{a["name"]}-t{b}"')
            lines.append("set = [" + ", ".join(sets + [f'"train.max_steps={steps_for(b, budget)}"']) + "]")
            if a is not arms[0] and a["match"]:
                lines.append(f'match = "{base_name}"')
            if b != mine[-1]:
                lines.append(f'branch_of = "{a["name"]}-t{mine[-1]}"')
    return "\n".join(lines) + "\n"


def write_plans():
    for path, title, prefix, arms, budgets, budget in [
        ("configs/capacity.toml", "The capacity-limited regime: deep shared and LORS stacks vs vanilla at P = 98,816 block parameters, byte-level Moby Dick + Brown",
         "capacity_", ARMS_P, BUDGETS, P),
        ("configs/capacity-2p.toml", "The capacity-limited regime, second budget: 2P = 197,632 block parameters",
         "capacity2p_", ARMS_2P, BUDGETS_2P, 2 * P),
    ]:
        (ROOT / path).write_text(plan_text(title, prefix, arms, budgets, budget))
        print(f"wrote {path}: {len(arms)} arms x {len(budgets)} budgets")


def lors_lm(args):
    if args.lors_lm:
        return args.lors_lm
    for p in [ROOT / "target/release/lors-lm", Path(os.environ.get("CARGO_TARGET_DIR", "/nonexistent")) / "release/lors-lm"]:
        if p.exists():
            return str(p)
    sys.exit("no lors-lm binary: build it (cargo build --release) or pass --lors-lm PATH")


def data(args):
    subprocess.check_call(["bash", str(ROOT / "scripts/fetch_corpus.sh"), "all"])
    out = ROOT / DATA
    if (out / "meta.json").exists():
        print(f"{DATA} already prepared")
    else:
        subprocess.check_call([lors_lm(args), "prepare", "--vocab-size", "257", "--input", "data/moby-dick", "data/brown",
                               "--out", DATA], cwd=ROOT)
    small = ROOT / "data/moby-bytes"
    if not (small / "meta.json").exists():
        subprocess.check_call([lors_lm(args), "prepare", "--vocab-size", "257", "--input", "data/moby-dick",
                               "--out", "data/moby-bytes"], cwd=ROOT)


def bench(exe, a, steps, threads):
    """Training tokens/s of arm `a` (random tokens, the plan's batch and sequence)."""
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
        f.write(f"[model]\nvocab_size = {V}\nd_model = {a['d']}\nn_layers = {a['layers']}\nn_heads = {a['heads']}\n"
                f"ffn_hidden = {a['ffn']}\nmax_seq_len = {SEQ}\n[train]\nbatch_size = {BATCH}\nseq_len = {SEQ}\n")
        cfg = f.name
    cmd = [exe, "bench", "--config", cfg, "--modes", a["mode"], "--steps", str(steps), "--warmup", "2",
           "--rounds", "1", "--json", "--prompt-tokens", "0"]
    for s in a["extra"]:
        cmd += ["--set", s]
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, text=True), cfg


def result(p):
    out, _ = p.communicate()
    return json.loads(out.strip().splitlines()[-1])


def time_arms(args):
    """Per arm: one job with 2 threads, then two 1-thread jobs side by side (the same arm
    twice: what --jobs 2 does), in the same round; the grid's hours from the faster."""
    exe = lors_lm(args)
    rows = []
    for plan_arms, budgets, budget in [(ARMS_P, BUDGETS, P), (ARMS_2P, BUDGETS_2P, 2 * P)]:
        for a in plan_arms:
            p, cfg = bench(exe, a, args.steps, 2)
            two = result(p)["train_tokens_per_sec"]
            ps = [bench(exe, a, args.steps, 1) for _ in range(2)]
            side = sum(result(p)["train_tokens_per_sec"] for p, _ in ps)
            for _, c in ps + [(None, cfg)]:
                os.unlink(c)
            mine = a["budgets"] or budgets
            steps = steps_for(mine[-1], budget) + sum(round(0.2 * steps_for(b, budget)) for b in mine[:-1])
            tokens = steps * TOKENS_PER_STEP
            rows.append(dict(arm=a["name"], budget=budget, block=lors_extra_params(a), tok_s_2threads=two,
                             tok_s_2jobs=side, hours_per_seed=tokens / max(two, side) / 3600))
            r = rows[-1]
            print(f"{r['arm']:<18} {r['block']:>7} block params  1 job x 2 threads {two:8.0f} tok/s   2 jobs x 1 thread "
                  f"{side:8.0f} tok/s ({side / two:.2f}x)   {tokens / 1e6:6.1f}M tokens per seed: {r['hours_per_seed']:.2f} h",
                  flush=True)
    total = 2 * sum(r["hours_per_seed"] for r in rows)
    print(f"grid, 2 seeds, training steps alone: {total:.1f} hours (at the faster of the two ways per arm)")
    (ROOT / "runs").mkdir(exist_ok=True)
    (ROOT / "runs/capacity_timing.json").write_text(json.dumps(rows, indent=1))


def sweep(args, plan, extra):
    cmd = [lors_lm(args), "sweep", "--plan", plan, "--jobs", str(args.jobs)] + extra
    print("+", " ".join(cmd), flush=True)
    subprocess.check_call(cmd, cwd=ROOT)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["plan", "data", "time", "run", "smoke"])
    ap.add_argument("--lors-lm", help="the lors-lm binary")
    ap.add_argument("--jobs", type=int, default=2, help="chains side by side (run, smoke)")
    ap.add_argument("--steps", type=int, default=6, help="timed steps per arm (time)")
    args = ap.parse_args()
    if args.what == "plan":
        write_plans()
    elif args.what == "data":
        data(args)
    elif args.what == "time":
        time_arms(args)
    elif args.what == "run":
        data(args)
        for plan in ["configs/capacity.toml", "configs/capacity-2p.toml"]:
            sweep(args, plan, [])
    elif args.what == "smoke":
        data(args)
        for plan in ["configs/capacity.toml", "configs/capacity-2p.toml"]:
            sweep(args, plan, ["--smoke", "--data", "data/moby-bytes"])


if __name__ == "__main__":
    main()
