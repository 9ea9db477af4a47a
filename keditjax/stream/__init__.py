"""Edits in practice: a live editing loop with rollback, and edit manifests.

  live.LiveModel     serves reads while edits arrive; atomic param swaps,
                     micro-batching, rollback
  manifest           what an edited checkpoint declares (base fingerprint,
                     every edit, every tensor's hash), optional signing
  verify             checks an edited checkpoint against its base and
                     manifest, and reports unexplained changes

The top layer of the library (DESIGN.md): it imports editors and models,
nothing imports it.
"""
