"""Bytes autograd holds for backward after one forward + loss, exact vs actnn_aq, on a
transformers BERT with SDPA attention (any device; no timing, so the CPU gives the same bytes).

    python benchmark/held_bytes.py --layers 4 --bit 1.25 --attention-bit 8 32

Counted: the storages of every tensor autograd saves (saved-tensor hooks see actnn_aq's
compressed payloads too, as they go through save_for_backward), parameters left out (they
are references, not copies). actnn_aq runs one training step first, so the second forward
uses the levels its first re-allocation chose.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import actnn_aq


def held_bytes(step, params: set[int]) -> int:
    storages = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            storages[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = step()
    loss.backward()
    return sum(storages.values())


def main(argv=None) -> None:
    from transformers import BertConfig, BertForSequenceClassification

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--bit", type=float, default=1.25)
    parser.add_argument("--aq-bit", type=float, default=0.5)
    parser.add_argument("--attention-bit", type=int, nargs="+", default=[8])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    config = BertConfig(hidden_size=1024, num_hidden_layers=args.layers, num_attention_heads=16,
                        intermediate_size=4096, num_labels=2)
    config._attn_implementation = "sdpa"
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq_len), device=args.device)
    labels = torch.randint(0, 2, (args.batch,), device=args.device)

    def measure(wrap) -> int:
        torch.manual_seed(0)
        model = BertForSequenceClassification(config).to(args.device)
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        model = wrap(model)
        step = lambda: F.cross_entropy(model(input_ids=ids).logits, labels)  # noqa: E731
        held_bytes(step, params)
        return held_bytes(step, params)

    exact = measure(lambda m: m)
    print(f"BERT-Large config, {args.layers} layers, batch {args.batch}, sequence {args.seq_len}, "
          f"{args.device}: exact {exact / 2**20:.2f} MiB")
    for attention_bit in args.attention_bit:
        actnn_aq.set_optimization_level("L3", bit=args.bit, aq_bit=args.aq_bit)
        actnn_aq.config.attention_bit = attention_bit
        held = measure(actnn_aq.QModule)
        print(f"actnn_aq {args.bit:g} bit, attention at {attention_bit}: {held / 2**20:.2f} MiB, "
              f"{exact / held:.1f}x smaller")


if __name__ == "__main__":
    main()
