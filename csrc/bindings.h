// The registration functions of kdfast._C: one per op file, all called by bindings.cpp.
#pragma once

#include <pybind11/pybind11.h>

void register_topk(pybind11::module_& m);
void register_plackett_luce(pybind11::module_& m);
void register_plackett_luce_emb_forward(pybind11::module_& m);
void register_plackett_luce_emb_backward(pybind11::module_& m);
void register_full_catalog(pybind11::module_& m);
void register_topology(pybind11::module_& m);
void register_sampling(pybind11::module_& m);
void register_rank_of_ids(pybind11::module_& m);
