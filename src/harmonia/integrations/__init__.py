"""harmonia's methods inside third-party trainers, through the same library objects a plain loop uses.

* :mod:`harmonia.integrations.lightning`: PyTorch Lightning (``pip install 'harmonia[lightning]'``) — the
  balancing methods as one callback, and the gradient harmonizer under manual optimisation.

Importing this package imports no trainer; each submodule imports its own and names the extra to install
when it is missing.
"""
