"""`meshlens demo`: a small shop of instrumented services behind sidecars, with faults, on one machine, from
observe to enforce.

The demo is composition: it runs the collector, the control plane, the sidecars, the tap and
the sample services as subprocesses (supervisor.py), drives them with a bounded load that
carries known faults (load.py, shop.py, topology.py) and tells the story in phases (phases.py,
story.py): what each observer recorded (progress.py), the recommendations (summary.py), the
`meshlens` commands that try them in dry-run and enforce them under a guard (commands.py), and
the figures of each phase read back from the store (figures.py); run.py holds it together.
"""
