"""Drop-in losses for other training libraries, computed by mmloss's fused kernels.

- `mmloss.integrations.sentence_transformers`: MultipleNegativesRankingLoss, its symmetric and
  cached variants, GISTEmbedLoss and CachedGISTEmbedLoss, and the new AngularMarginMNRL and
  TeacherFilteredMNRL (needs sentence-transformers 6.x);
- `mmloss.integrations.open_clip`: OpenCLIP's ClipLoss (needs only torch).

Nothing here is imported by `import mmloss`; docs/integrations.md says what each supports.
"""
