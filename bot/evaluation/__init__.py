"""Measured answer quality: `vlbot eval` on a generated, labelled image set.

- fonts, canvas, screens, documents, scenes: drawing the cases (Debian fonts only);
- dataset: the set on disk, its manifest and the cache folder;
- scoring: CER, word accuracy, field match, ANLS, keyword recall;
- running: asking an engine through the presets, timing and scoring each case;
- results, report, compare, command: aggregates, the JSON/Markdown/HTML reports, side-by-side
  comparisons and the command itself.
"""
