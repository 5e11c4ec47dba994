""" Tools built on the core: the ``jetmoe-timm`` command line (convert, push, inspect, data, demo, bench), the demo,
benchmarks, routing plots, small offline datasets and the train.py / validate.py launchers' plumbing.

Tools import the core (layers, models, recycling, export, Hub); the core never imports a tool. The two launchers
``jetmoe_timm/train.py`` and ``validate.py`` are tools too, kept at the package's top for their module paths
(``python -m jetmoe_timm.train``, ``torchrun -m jetmoe_timm.train``); nothing in the core imports them.
"""
