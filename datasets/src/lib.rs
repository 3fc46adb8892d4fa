//! hylo-datasets
