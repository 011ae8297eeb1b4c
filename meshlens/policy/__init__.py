"""The policy model: the documents a mesh is configured with (Istio's kinds, meshlens' own), checked.

Shared by the control plane, which checks every document before it stores it, and the
sidecar, which reads the same documents from its snapshot: one reading of each field.
"""
