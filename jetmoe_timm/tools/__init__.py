""" Tools built on the core: the ``jetmoe-timm`` command line (convert, push, inspect, data, demo, bench), the demo,
benchmarks, routing plots, small offline datasets and the train.py / validate.py launchers' plumbing.

Tools import the core (layers, models, recycling, export, Hub); the core never imports a tool.
"""
