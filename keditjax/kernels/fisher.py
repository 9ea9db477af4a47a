"""Diagonal Fisher information, the EWC penalty and the FT-L projection.

Pure array math over parameter pytrees; the model enters only through a
per-example log-likelihood `loglik_fn(params, example) -> scalar` (an
`example` is one element of a batch pytree, with no batch axis).

For examples (x_n, y_n), n = 1..N (Kirkpatrick et al. 2017, eq. 3 and its
supplement; Martens 2020 on "empirical" vs "true"):

  empirical Fisher  F_i = 1/N Σ_n (∂ log p(y_n | x_n; θ) / ∂θ_i)²
                    (labels y_n from the data);
  true Fisher       F_i = 1/N Σ_n E_{ŷ ~ p(·|x_n; θ)} (∂ log p(ŷ | x_n; θ) / ∂θ_i)²
                    (labels sampled from the model, a Monte-Carlo estimate);
  EWC penalty       Ω(θ) = ½ λ Σ_i F_i (θ_i − θ*_i)²,   ∇Ω = λ F ⊙ (θ − θ*);
  FT-L projection   Π(θ) = θ₀ + clip(θ − θ₀, −δ, δ)  (Zhu et al. 2020, the
                    L∞ ball ‖θ − θ₀‖∞ ≤ δ around the unedited weights).

Per-example gradients come from `jax.vmap(jax.grad(loglik_fn))`, evaluated
in chunks of `chunk` examples inside a `lax.scan`, so memory is
`chunk × |θ|` rather than `N × |θ|`.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


def squared_grad_sum(loglik_fn: Callable, params, batch, mask_B, *,
                     chunk: int | None = None):
  """Σ_n mask_n (∇_θ log p(y_n | x_n; θ))², leaf by leaf.

  Args:
    loglik_fn: `(params, example) -> scalar` log-likelihood of one example.
    params: the pytree differentiated (usually the edited subset).
    batch: a pytree whose leaves have a leading batch axis of size B.
    mask_B: float weights (1 for a real example, 0 for padding).
    chunk: examples per vmapped gradient (must divide B); default B.

  Returns:
    A pytree like `params` (float32): the masked sum of squared per-example
    gradients. Divide by the number of examples for the Fisher diagonal.
  """
  size = mask_B.shape[0]
  chunk = size if chunk is None else min(chunk, size)
  if size % chunk:
    raise ValueError(f"chunk={chunk} does not divide the batch size {size}.")
  per_example = jax.vmap(jax.grad(loglik_fn), in_axes=(None, 0))
  split = lambda x: x.reshape((size // chunk, chunk) + x.shape[1:])
  chunks = (jax.tree.map(split, batch), split(mask_B.astype(jnp.float32)))

  def body(acc, xs):
    examples, mask_C = xs
    grads = per_example(params, examples)
    acc = jax.tree.map(
        lambda a, g: a + jnp.tensordot(mask_C, jnp.square(
            g.astype(jnp.float32)), axes=1), acc, grads)
    return acc, None

  zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
  total, _ = jax.lax.scan(body, zeros, chunks)
  return total


def ewc_penalty(params, anchor, fisher, lam):
  """½ λ Σ_i F_i (θ_i − θ*_i)² over every leaf (Kirkpatrick et al., eq. 3).

  Args:
    params: θ, the current parameters (a pytree).
    anchor: θ*, the parameters the Fisher was taken at (same structure).
    fisher: F, the diagonal Fisher (same structure, non-negative).
    lam: λ, the penalty strength.

  Returns:
    A float32 scalar.
  """
  terms = jax.tree.map(
      lambda p, a, f: jnp.sum(f * jnp.square(
          p.astype(jnp.float32) - a.astype(jnp.float32))),
      params, anchor, fisher)
  return 0.5 * lam * sum(jax.tree.leaves(terms))


def ewc_penalty_grad(params, anchor, fisher, lam):
  """∇_θ of `ewc_penalty` in closed form: λ F ⊙ (θ − θ*)."""
  return jax.tree.map(
      lambda p, a, f: lam * f * (p.astype(jnp.float32) - a.astype(jnp.float32)),
      params, anchor, fisher)


def project_linf(params, anchor, radius):
  """θ projected onto {θ : ‖θ − θ₀‖∞ ≤ δ}: θ₀ + clip(θ − θ₀, −δ, δ).

  The Euclidean projection onto a box is the coordinate-wise clip, so this
  is the exact projected-gradient step of Zhu et al. (2020), eq. 2.
  """
  return jax.tree.map(
      lambda p, a: (a + jnp.clip(p - a, -radius, radius)).astype(p.dtype),
      params, anchor)


def linf_distance(params, anchor):
  """max_i |θ_i − θ₀_i| over every leaf (a float32 scalar)."""
  maxima = jax.tree.map(
      lambda p, a: jnp.max(jnp.abs(p.astype(jnp.float32) -
                                   a.astype(jnp.float32))), params, anchor)
  return jnp.max(jnp.stack(jax.tree.leaves(maxima)))
