#!/usr/bin/env python3
"""Print what TensorBoard itself reads from an event directory, as JSON:
{"scalars": {tag: [[step, value], ...]}, "texts": {tag: [[step, text], ...]},
 "tensor_tags": [...], "text_plugin_tags": [...], "layouts": [[step, layout], ...]}
where "layouts" are the custom-scalars layouts (tag custom_scalars__config__) parsed as
tensorboard.Layout protos (as JSON). With --plugin also
 "custom_scalars": {"layout": layout, "tags": {regex: [tag, ...]}}: what the Custom Scalars
tab gets from TensorBoard's CustomScalarsPlugin (its /layout answer, and for every tag regex of
that layout the scalar tags its /scalars answer plots).
Usage: tb_read.py DIR [--plugin]. Default: the classic EventAccumulator; --plugin: the
plugin_event_accumulator that `tensorboard --load_fast=false` serves from. All points are
kept (size guidance 0). Used by tests/tensorboard_files.rs; needs `pip install tensorboard`."""
import json
import sys

from google.protobuf import json_format
from tensorboard.backend.event_processing import event_accumulator as ea
from tensorboard.backend.event_processing import plugin_event_accumulator as pea
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.plugins.custom_scalar import metadata as cs_metadata


def plugin_tags(acc, plugin):
    try:
        return sorted(acc.PluginTagToContent(plugin))
    except KeyError:  # no summaries of that plugin
        return []


def layouts(acc):
    if cs_metadata.CONFIG_SUMMARY_TAG not in acc.Tags()["tensors"]:
        return []
    points = []
    for e in acc.Tensors(cs_metadata.CONFIG_SUMMARY_TAG):
        (content,) = e.tensor_proto.string_val
        points.append([e.step, json_format.MessageToDict(layout_pb2.Layout.FromString(content))])
    return points


def custom_scalars(directory):
    """The Custom Scalars tab's view of DIR, served as `tensorboard --load_fast=false` does."""
    from tensorboard import context
    from tensorboard.backend.event_processing import data_provider
    from tensorboard.backend.event_processing import plugin_event_multiplexer
    from tensorboard.plugins import base_plugin
    from tensorboard.plugins.custom_scalar.custom_scalars_plugin import CustomScalarsPlugin
    from tensorboard.plugins.scalar.scalars_plugin import ScalarsPlugin

    multiplexer = plugin_event_multiplexer.EventMultiplexer()
    multiplexer.AddRunsFromDirectory(directory)
    multiplexer.Reload()
    plugins = {}
    tb_context = base_plugin.TBContext(
        logdir=directory,
        data_provider=data_provider.MultiplexerDataProvider(multiplexer, directory),
        multiplexer=multiplexer,
        plugin_name_to_instance=plugins,
    )
    plugins["scalars"] = ScalarsPlugin(tb_context)
    plugin = CustomScalarsPlugin(tb_context)
    plugins[cs_metadata.PLUGIN_NAME] = plugin
    ctx = context.RequestContext()
    layout = plugin.layout_impl(ctx, "")
    layout = json.loads(layout) if isinstance(layout, str) else layout
    tags = {}
    for category in layout.get("category", []):
        for chart in category.get("chart", []):
            for regex in chart.get("multiline", {}).get("tag", []):
                answer = plugin.scalars_impl(ctx, ".", regex, "")
                assert answer["regex_valid"], regex
                tags[regex] = sorted(answer["tag_to_events"])
    return {"layout": layout, "tags": tags}


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
    "layouts": layouts(acc),
    **({"custom_scalars": custom_scalars(directory)} if "--plugin" in sys.argv[2:] else {}),
}))
