"""Slicer side of COLIPRISlicer: the panel, the Logic, MRML nodes in and out of the engine.

Unlike ``COLIPRISlicerLib`` (the engine, which never imports Slicer), this package works
on MRML nodes and on Slicer's main thread; only ``session`` touches the worker thread,
which owns the engine (one ``EngineSession`` per process, shared by every Logic).

Modules: ``panel`` (the module panel: GUI <-> parameter node, lifecycle), ``jobs`` (one
panel action at a time, newest request wins), ``run_state`` (the Analyze state machine),
``logic`` (``AnalysisLogic``: nodes in, engine calls, nodes out), ``session`` (worker
thread, engine, status lines and warnings), ``volume_nodes`` (volume node -> engine
``Volume``, signatures, heatmap volume nodes), ``importer``/``outputs``/``result_nodes``
(this module's nodes: created together, replaced on re-run, rolled back on failure),
``views`` (slice layers, jumps, layout), ``similar_cases`` and ``similar_cases_panel`` (index
Slicer's DICOM database, search an index, load a hit beside the current volume; the panel's
section), ``runtime`` (device, offline mode, weights
folders, settings; no Slicer import) and ``dependencies`` (asking, then installing).
"""
