from .personalized_preference import per_user_accuracy, personalized_preference_metrics

__all__ = ["per_user_accuracy", "personalized_preference_metrics"]
