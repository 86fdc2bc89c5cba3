/* edgeml_roles.h: the Edge and Inference roles in C (included by edgeml.h;
 * include edgeml.h, not this). Being written: see docs/c-api.md. */
#ifndef EDGEML_ROLES_H
#define EDGEML_ROLES_H
#include "edgeml_trainer.h"
#endif
