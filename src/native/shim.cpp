// The two libtorch operations tch does not expose: graph surgery on a
// TorchScript module (a `features` method: `forward` without its final
// linear layer) and choosing autocast's CUDA dtype (bf16).
//
// Errors come back as a heap string the caller frees with
// `ft_free_message`; success is a null pointer.

#include <cstring>
#include <string>

#include <ATen/autocast_mode.h>
#include <torch/csrc/jit/api/function_impl.h>
#include <torch/csrc/jit/passes/dead_code_elimination.h>
#include <torch/csrc/jit/passes/inliner.h>
#include <torch/script.h>

namespace {

char* message(const std::string& text) { return strdup(text.c_str()); }

// The node that produced `value`, looking through ops that keep the
// features as they are (a flatten, a dropout in eval mode).
torch::jit::Node* producer(torch::jit::Value* value) {
  auto* node = value->node();
  while (node->kind() == c10::Symbol::fromQualString("aten::dropout") ||
         node->kind() == c10::Symbol::fromQualString("aten::flatten")) {
    node = node->inputs()[0]->node();
  }
  return node;
}

// The dotted attribute path (`classifier.1.weight`) a value was read from.
std::string attribute_path(torch::jit::Value* value) {
  std::vector<std::string> parts;
  auto* node = value->node();
  while (node->kind() == c10::prim::GetAttr) {
    parts.push_back(node->s(c10::attr::name));
    node = node->inputs()[0]->node();
  }
  std::string path;
  for (auto part = parts.rbegin(); part != parts.rend(); ++part) {
    path += (path.empty() ? "" : ".") + *part;
  }
  return path;
}

}  // namespace

extern "C" {

void ft_free_message(char* text) { free(text); }

// Reads the TorchScript module at `in_path`; when `strip_linear`, adds a
// method `features` that is `forward` up to (not including) its final
// linear layer, else one that is `forward` itself. Saves the result to
// `out_path`. `*removed` gets the removed layer's weight path
// (`fc.weight`; freed with `ft_free_message`), or null.
char* ft_script_add_features(const char* in_path, const char* out_path, bool strip_linear,
                             char** removed) {
  try {
    *removed = nullptr;
    auto module = torch::jit::load(in_path);
    auto& forward = torch::jit::toGraphFunction(module.get_method("forward").function());
    auto graph = forward.graph()->copy();
    torch::jit::Inline(*graph);
    if (graph->outputs().size() != 1) {
      return message("forward must return one tensor");
    }
    std::string removed_path;
    if (strip_linear) {
      auto* last = producer(graph->outputs()[0]);
      torch::jit::Value* features = nullptr;
      torch::jit::Value* weight = nullptr;
      if (last->kind() == c10::Symbol::fromQualString("aten::linear")) {
        features = last->inputs()[0];
        weight = last->inputs()[1];
      } else if (last->kind() == c10::Symbol::fromQualString("aten::addmm")) {
        // Older traces: addmm(bias, x, weight.t()).
        features = last->inputs()[1];
        auto* transposed = last->inputs()[2]->node();
        weight = transposed->inputs()[0];
      } else {
        return message("forward does not end with a linear layer (its last operation is " +
                       std::string(last->kind().toQualString()) + ")");
      }
      removed_path = attribute_path(weight);
      graph->eraseOutput(0);
      graph->registerOutput(features);
      torch::jit::EliminateDeadCode(graph);
    }
    auto name = c10::QualifiedName(*module.type()->name(), "features");
    auto* function = module._ivalue()->compilation_unit()->create_function(name, graph);
    module.type()->addMethod(function);
    module.save(out_path);
    if (strip_linear) {
      *removed = message(removed_path);
    }
    return nullptr;
  } catch (const std::exception& e) {
    return message(e.what());
  }
}

// Autocast on CUDA computes in bf16 instead of libtorch's default fp16
// (for the calling thread, where autocast's state lives).
void ft_autocast_cuda_bf16() { at::autocast::set_autocast_dtype(at::kCUDA, at::kBFloat16); }

}  // extern "C"
