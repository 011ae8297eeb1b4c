"""The control plane: the mesh model, the policies and each service's mode, stored with revisions and audited, served to sidecars and operators."""
