"""Slicer side of COLIPRISlicer: MRML nodes in and out of the engine, views, dependencies.

Unlike ``COLIPRISlicerLib`` (the engine, which never imports Slicer), this package works
on MRML nodes. It runs on Slicer's main thread only and holds no model state: the
module's Logic owns the engine and its worker thread.

Modules, in data-flow order: ``volume_nodes`` (volume node -> engine ``Volume``, heatmap
volume nodes), ``outputs`` (tagging, replacing and rolling back this module's nodes),
``result_nodes`` (findings table and chart, report, segmentation, snippet point and depth
profile), ``views`` (slice layers, jumps, layout), ``runtime`` (device, offline mode,
weights folders; no Slicer import) and ``dependencies`` (asking, then installing).
"""
