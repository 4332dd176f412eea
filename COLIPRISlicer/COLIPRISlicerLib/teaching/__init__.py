"""The teaching kit: synthetic phantom chest CTs with ground truth, and the small COLIPRI-architecture
teaching model trained, calibrated and evaluated on them (``colipri-slicer phantom``, ``demo``,
``train-phantom``, ``eval-phantom``).

Installed with the engine for the command line and the tests, not shipped into Slicer: the module
only loads the bundled model folder (``Resources/Models/phantom``). Data path: ``anatomy`` and
``findings`` build a phantom (``phantom``); ``stream`` generates many in worker processes;
``dataset`` reduces them to model-grid samples, ``batches`` stacks them on the training device and
``augmentation`` gives new views; ``objectives`` are the losses, ``training`` the two phases and
``recipes``; ``bundle`` adds the head and calibration, ``evaluation`` the held-out figures;
``pipeline`` runs these stages in order for ``train-phantom``.
"""
