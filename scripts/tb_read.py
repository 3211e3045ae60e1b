#!/usr/bin/env python3
"""Print what TensorBoard itself reads from an event directory, as JSON:
{"scalars": {tag: [[step, value], ...]}, "texts": {tag: [[step, text], ...]},
 "tensor_tags": [...], "text_plugin_tags": [...]}
Usage: tb_read.py DIR [--plugin]. Default: the classic EventAccumulator; --plugin: the
plugin_event_accumulator that `tensorboard --load_fast=false` serves from. All points are
kept (size guidance 0). Used by tests/tensorboard_files.rs; needs `pip install tensorboard`."""
import json
import sys

from tensorboard.backend.event_processing import event_accumulator as ea
from tensorboard.backend.event_processing import plugin_event_accumulator as pea


def plugin_tags(acc, plugin):
    try:
        return sorted(acc.PluginTagToContent(plugin))
    except KeyError:  # no summaries of that plugin
        return []


directory = sys.argv[1]
if "--plugin" in sys.argv[2:]:
    from tensorboard.util import tensor_util

    acc = pea.EventAccumulator(directory, size_guidance={pea.TENSORS: 0})
    acc.Reload()
    scalars = {t: [[e.step, float(tensor_util.make_ndarray(e.tensor_proto))]
                   for e in acc.Tensors(t)] for t in plugin_tags(acc, "scalars")}
else:
    acc = ea.EventAccumulator(directory, size_guidance={ea.SCALARS: 0, ea.TENSORS: 0})
    acc.Reload()
    scalars = {t: [[e.step, e.value] for e in acc.Scalars(t)] for t in acc.Tags()[ea.SCALARS]}
print(json.dumps({
    "scalars": scalars,
    "texts": {t: [[e.step, b"\n".join(e.tensor_proto.string_val).decode()] for e in acc.Tensors(t)]
              for t in plugin_tags(acc, "text")},
    "tensor_tags": sorted(acc.Tags()["tensors"]),
    "text_plugin_tags": plugin_tags(acc, "text"),
}))
