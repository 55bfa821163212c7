"""Deep visualization (Yosinski et al.), split as Lucid's optvis: parameterisation
(start images), objectives (unit activations), transforms (regularisers) and the
optimisation loop."""
from custom_keras.techniques.deep_visualization.objectives import (UnitObjective, check_unit_list,
                                                                  check_units)
from custom_keras.techniques.deep_visualization.optimize import (
    DeepVisualizationModel, deep_visualization, gradient_ascent)
from custom_keras.techniques.deep_visualization.parameterization import (
    START_NOISE_STD, random_noise_images)
from custom_keras.techniques.deep_visualization.transforms import Regularizers, check_regularizers

__all__ = ["START_NOISE_STD", "DeepVisualizationModel", "Regularizers", "UnitObjective",
           "check_regularizers", "check_unit_list", "check_units", "deep_visualization", "gradient_ascent", "random_noise_images"]
