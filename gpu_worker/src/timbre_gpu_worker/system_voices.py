"""The system voices, as the worker sees them: the catalogue lives in timbre_common so services share it."""
from timbre_common.catalogue import (
                                     SYSTEM_VOICES,
                                     TIMBRE_VOICE_NAMESPACE,
                                     SystemVoice,
                                     system_voice_by_id,
                                     system_voice_by_name,
                                     system_voice_id,
)

__all__ = ["SYSTEM_VOICES", "TIMBRE_VOICE_NAMESPACE", "SystemVoice", "system_voice_by_id", "system_voice_by_name",
           "system_voice_id"]
