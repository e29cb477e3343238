// The libtorch operations tch does not expose: listing the operations of a
// TorchScript module's code, graph surgery on it (a `features` method:
// `forward` without its final linear layer), and choosing autocast's CUDA
// dtype (bf16). Modules travel as bytes: the check of an upload runs in a
// child process that may open no files.
//
// Errors come back as a heap string the caller frees with
// `ft_free_message`; success is a null pointer.

#include <cstring>
#include <set>
#include <sstream>
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

torch::jit::Module load_bytes(const char* data, size_t length) {
  std::istringstream in(std::string(data, length));
  return torch::jit::load(in);
}

// Appends `kind<TAB>function<TAB>file:line` for the first node of each kind
// in `block` and the blocks nested in it (branches, loop bodies).
void list_nodes(torch::jit::Block* block, const std::string& function, std::set<std::string>& seen,
                std::string& out) {
  for (auto* node : block->nodes()) {
    std::string kind = node->kind().toQualString();
    if (seen.insert(kind).second) {
      std::string where;
      if (auto location = node->sourceRange().file_line_col()) {
        where = std::get<0>(*location) + ":" + std::to_string(std::get<1>(*location));
      }
      out += kind + "\t" + function + "\t" + where + "\n";
    }
    for (auto* nested : node->blocks()) {
      list_nodes(nested, function, seen, out);
    }
  }
}

}  // namespace

extern "C" {

void ft_free_message(char* text) { free(text); }

// Every operation kind in every method of every module type of the module
// (`__setstate__` included), each inlined, so calls into other classes and
// functions are covered: one line per kind and method,
// `kind<TAB>method<TAB>file:line`. `*listing` is freed with
// `ft_free_message`.
char* ft_script_operations(const char* data, size_t length, char** listing) {
  try {
    *listing = nullptr;
    auto module = load_bytes(data, length);
    std::string out;
    std::set<std::string> types;
    auto visit = [&](const torch::jit::Module& each) {
      if (!types.insert(each.type()->name()->qualifiedName()).second) {
        return;
      }
      for (const auto& method : each.get_methods()) {
        auto& function = torch::jit::toGraphFunction(method.function());
        auto graph = function.graph()->copy();
        torch::jit::Inline(*graph);
        std::set<std::string> seen;
        list_nodes(graph->block(), function.qualname().qualifiedName(), seen, out);
      }
    };
    visit(module);
    for (const auto& each : module.modules()) {
      visit(each);
    }
    *listing = message(out);
    return nullptr;
  } catch (const std::exception& e) {
    return message(e.what());
  }
}

// Reads the TorchScript module in `data`; when `strip_linear`, adds a
// method named `method` that is `forward` up to (not including) its final
// linear layer, else one that is `forward` itself. The saved result goes to
// `*out` / `*out_length` (freed with `ft_free_message`). `*removed` gets the
// removed layer's weight path (`fc.weight`; freed likewise), or null.
char* ft_script_add_features(const char* data, size_t length, const char* method, bool strip_linear,
                             char** removed, char** out, size_t* out_length) {
  try {
    *removed = nullptr;
    *out = nullptr;
    *out_length = 0;
    auto module = load_bytes(data, length);
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
    auto name = c10::QualifiedName(*module.type()->name(), method);
    auto* function = module._ivalue()->compilation_unit()->create_function(name, graph);
    module.type()->addMethod(function);
    std::ostringstream saved;
    module.save(saved);
    auto bytes = saved.str();
    *out = static_cast<char*>(malloc(bytes.size()));
    if (*out == nullptr) {
      return message("out of memory saving the module");
    }
    memcpy(*out, bytes.data(), bytes.size());
    *out_length = bytes.size();
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
