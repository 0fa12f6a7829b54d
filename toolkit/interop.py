"""The toolkit's explainers inside the evaluation tools people already use.

* **Quantus** (metrics of explanation quality): :class:`QuantusExplainer` is an
  ``explain_func`` as Quantus calls it, ``explain_func(model=..., inputs=..., targets=...)``
  with NumPy arrays in and out. Quantus's randomisation metrics (``quantus.MPRT`` and
  friends) hand it a copy of the model with randomised layers; the adapter notices that
  the model's weights are not those its patterns were fitted for (by the model's
  :func:`~toolkit.patterns.fingerprint`) and fits the patterns again on the data it was
  given, once per distinct set of weights. With ``refit=False`` it uses the stale
  patterns instead (:func:`toolkit.sanity.stale_patterns`), the labelled variant of the
  randomisation check.
* **Captum** (attribution methods): :func:`captum_attribution` wraps an explainer as a
  ``captum.attr.Attribution``, so it goes wherever Captum expects an attribution method,
  e.g. ``captum.attr.NoiseTunnel`` (SmoothGrad) over PatternAttribution.

Nothing here imports Quantus or Captum when the module is imported; :func:`captum_attribution`
imports Captum when it is called, and the Quantus adapter needs no Quantus at all.

Example::

    import quantus
    from captum.attr import NoiseTunnel
    from toolkit.interop import QuantusExplainer, captum_attribution

    explain = QuantusExplainer("patternattribution", data=train_images[:256])
    quantus.MPRT()(model=model, x_batch=x, y_batch=y, explain_func=explain)
    smooth = NoiseTunnel(captum_attribution(toolkit.PatternAttribution(model, patterns)))
    smooth.attribute(images, nt_type="smoothgrad", nt_samples=8, stdevs=0.1, target=labels)
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import nn

__all__ = ["QuantusExplainer", "captum_attribution"]


class QuantusExplainer:
    """An ``explain_func`` for Quantus: a registered method, NumPy in and out.

    Parameters
    ----------
    method : str or toolkit.methods.Method
        A name of :data:`toolkit.methods.REGISTRY` (``"patternattribution"``, ...).
    patterns : toolkit.patterns.Patterns, optional
        Patterns of the model the metric is called with; fitted on ``data`` when missing.
    data : Tensor or iterable, optional
        The inputs patterns are fitted on, for a model whose patterns are not known yet
        (every randomised copy a Quantus randomisation metric hands over). Needed by the
        pattern methods unless ``patterns`` fits every model the adapter sees.
    refit : bool
        True (default): fit patterns for every model with other weights. False: use the
        patterns given (of the original model) for any model, labelled stale
        (:func:`toolkit.sanity.stale_patterns`): the randomisation check's variant with
        stale patterns.
    make_explainer : callable, optional
        ``make_explainer(method, model, patterns) -> explainer``; default: the registered
        class (pattern methods with ``never_active="linear"``, since a randomised output
        layer often has classes that are never active).
    fit_options : dict, optional
        Keyword arguments of :func:`toolkit.fit_patterns` (``mean_y``, ``batch_size``, ...).

    Attributes
    ----------
    fits : int
        How many times patterns were fitted (one per distinct set of weights).

    Notes
    -----
    Quantus calls ``explain_func(model=model, inputs=x, targets=y, **explain_func_kwargs)``
    with ``x`` an ``(N, C, H, W)`` array and ``y`` the classes, and adds ``device=``. The
    inputs are cast to the model's dtype and device (the ``device`` Quantus passes is not
    needed); the result is a float array shaped like ``x``.
    """

    def __init__(self, method, patterns=None, data=None, refit: bool = True,
                 make_explainer: Callable | None = None, fit_options: dict | None = None):
        from toolkit.methods import Method, get_method
        from toolkit.sanity import default_explainer

        self.method = method if isinstance(method, Method) else get_method(method)
        self.data, self.refit = data, refit
        self.make_explainer = make_explainer or default_explainer
        self.fit_options = dict(fit_options or {})
        self.original = patterns
        self._patterns = {} if patterns is None else {patterns.fingerprint: patterns}
        self.fits = 0

    def __repr__(self) -> str:
        return f"QuantusExplainer({self.method.name!r}, refit={self.refit}, fits={self.fits})"

    def patterns_for(self, model: nn.Module):
        """The patterns the adapter explains ``model`` with: its own (fitted now if they are
        not known yet) or, with ``refit=False``, the first model's, bound to it as stale."""
        from toolkit.patterns import fingerprint
        from toolkit.sanity import fit_quietly, fitted_kinds, stale_patterns

        if not self.method.needs_patterns:
            return None
        key = fingerprint(model)
        if key in self._patterns:
            return self._patterns[key]
        if not self.refit and self.original is not None:
            return stale_patterns(self.original, model)
        if self.data is None:
            raise ValueError(f"{self.method.name} needs the patterns of this model (fingerprint {key[:8]}), "
                             "and the adapter has no data to fit them on: give data=")
        fitted = fit_quietly(model, self.data, fitted_kinds([self.method]), **self.fit_options)
        self.fits += 1
        self._patterns[key] = fitted
        if self.original is None:
            self.original = fitted
        return fitted

    def __call__(self, model: nn.Module, inputs, targets, device=None, **kwargs) -> np.ndarray:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, not {type(model).__name__}")
        if kwargs:
            raise TypeError(f"unexpected explain_func_kwargs {sorted(kwargs)}; the adapter takes none "
                            "(the device Quantus passes is ignored: the model's own is used)")
        parameter = next(model.parameters())
        x = torch.as_tensor(np.asarray(inputs), device=parameter.device).to(parameter.dtype)
        target = torch.as_tensor(np.asarray(targets), device=parameter.device).long().reshape(-1)
        explainer = self.make_explainer(self.method, model, self.patterns_for(model))
        return explainer.attribute(x, target).detach().cpu().numpy()


def captum_attribution(explainer):
    """``explainer`` (anything with ``attribute(inputs, target)``) as a Captum attribution
    method (a ``captum.attr.Attribution`` whose ``forward_func`` is the explainer's model),
    so that Captum's wrappers, e.g. ``NoiseTunnel``, run it.

    The attribution takes ``attribute(inputs, target=None)``; Captum's wrappers pass the
    target expanded to their enlarged batches. It neither multiplies by the inputs nor
    has a convergence delta.
    """
    from captum.attr import Attribution
    from captum.log import log_usage

    class ToolkitAttribution(Attribution):
        """A toolkit explainer as a Captum attribution method."""

        def __init__(self, wrapped):
            super().__init__(getattr(wrapped, "model", None))
            self.explainer = wrapped

        @log_usage()
        def attribute(self, inputs, target=None):
            return self.explainer.attribute(inputs, target)

        def __repr__(self) -> str:
            return f"captum_attribution({self.explainer!r})"

    if not callable(getattr(explainer, "attribute", None)):
        raise TypeError("explainer must have a method attribute(inputs, target); "
                        f"got {type(explainer).__name__}")
    return ToolkitAttribution(explainer)
