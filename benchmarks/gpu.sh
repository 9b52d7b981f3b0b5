#!/usr/bin/env bash
# The prepared GPU check (one GPU, under 8 minutes): BERT-base MLM from config in bf16 with SDPA attention, sparse
# MLM head against dense, each with and without --torch_compile; a T5-base span-corruption run; MiniLM on SST-2.
# Prints tokens/s, MFU against the GPU's published bf16 peak (throughput.GPU_PEAK_TFLOPS) and peak memory per run,
# and writes them to $OUT (default outputs/gpu-check)/summary.json. Data: the embedded corpus (no download) and
# ../shared for MiniLM and SST-2 (that run is skipped without it). Usage: bash benchmarks/gpu.sh
# A dry run of the plumbing on a CPU: STEPS=2 LOG_EVERY=1 BERT_BATCH=2 T5_BATCH=1 GLUE_BATCH=2 bash benchmarks/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/gpu-check}
STEPS=${STEPS:-60} LOG_EVERY=${LOG_EVERY:-10} BERT_BATCH=${BERT_BATCH:-128} T5_BATCH=${T5_BATCH:-32} GLUE_BATCH=${GLUE_BATCH:-64}
SHARED=${SHARED:-$([ -d ../shared ] && echo ../shared || echo shared)}
MINILM=$SHARED/models/minilm-l6-h384-uncased
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
COMMON=(--bf16 --max_steps "$STEPS" --save_strategy no --report_to none --disable_tqdm True --logging_steps "$LOG_EVERY"
        --overwrite_output_dir --do_train --dataloader_num_workers 4)
run() {  # name, script, flags...
    local name=$1 script=$2; shift 2
    echo "== $name" >&2
    timeout 150 python "$script" "${COMMON[@]}" --output_dir "$OUT/$name" "$@" > "$OUT/$name.log" 2>&1 \
        || echo "$name failed (exit $?): see $OUT/$name.log" >&2
}
BERT=(--model_type bert --max_seq_length 128 --per_device_train_batch_size "$BERT_BATCH" --learning_rate 1e-4)
if [ -d "$MINILM" ]; then BERT+=(--tokenizer_name "$MINILM"); else BERT+=(--tokenizer_vocab_size 30522); fi  # BERT's 30,522 ids
run bert-sparse run_mlm.py "${BERT[@]}"
run bert-dense run_mlm.py "${BERT[@]}" --sparse_mlm_head false
run bert-sparse-compile run_mlm.py "${BERT[@]}" --torch_compile
run bert-dense-compile run_mlm.py "${BERT[@]}" --sparse_mlm_head false --torch_compile
run t5-base run_span_t5.py --model_type t5 --config_overrides "d_model=768,d_kv=64,num_heads=12,d_ff=2048,num_layers=12,feed_forward_proj=gated-gelu,tie_word_embeddings=false" \
    --max_seq_length 512 --per_device_train_batch_size "$T5_BATCH" --learning_rate 1e-3
if [ -d "$MINILM" ]; then
    run minilm-sst2 fine_tune_glue.py --model_name_or_path "$MINILM" --task_name sst2 --data_dir "$SHARED/data/glue/SST-2" \
        --per_device_train_batch_size "$GLUE_BATCH" --learning_rate 5e-5 --max_seq_length 128
fi
python - "$OUT" <<'PY'
import json, os, sys
out, rows = sys.argv[1], {}
for name in sorted(os.listdir(out)):
    state = os.path.join(out, name, "trainer_state.json")
    if os.path.isfile(state):
        logs = [h for h in json.load(open(state))["log_history"] if "tokens_per_second" in h]
        if logs:  # the last logging interval: past warm-up and compilation
            results = json.load(open(os.path.join(out, name, "all_results.json")))
            rows[name] = {"tokens_per_second": logs[-1]["tokens_per_second"], "mfu": logs[-1].get("mfu"),
                          "peak_memory_mb": results.get("peak_memory_mb")}
for name, r in rows.items():
    print(f"{name:22s} {r['tokens_per_second'] or 0:>12,.0f} tokens/s  MFU {r['mfu']}  peak {r['peak_memory_mb']} MB")
json.dump(rows, open(os.path.join(out, "summary.json"), "w"), indent=1)
PY
