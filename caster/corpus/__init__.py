"""`caster data build`: a 40-locale training corpus built offline from registry packages.

Text from packaged human-written sources (`caster.corpus.text`), speech from espeak-ng and flite
(`caster.corpus.synth`) with room and noise augmentation (`caster.corpus.augment`), and real
recordings from Debian's Asterisk prompts (`caster.corpus.asterisk`), planned, rendered and
written as NeMo manifests by `caster.corpus.build`. docs/corpus.md has the details.
"""

from caster.corpus.build import BuildConfig, BuildReport, CorpusError, build, plan

__all__ = ["BuildConfig", "BuildReport", "CorpusError", "build", "plan"]
