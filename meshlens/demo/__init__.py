"""`meshlens demo`: a small shop of instrumented services behind sidecars, with faults, on one machine.

The demo is composition: it runs the collector, the sidecars, the tap and the
sample services as subprocesses (supervisor.py), drives them with a bounded
load that carries known faults (load.py, shop.py), shows what each observer
recorded (progress.py) and ends with the recommendations (run.py).
"""
